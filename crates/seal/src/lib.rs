//! Values sealed at rest: secrets that Gantry stores in its database (a
//! project's secrets set with `gantry secrets set`) are sealed with
//! AES-256-GCM under a key from the Gantry configuration (`secrets_key`),
//! so that a copy of the database (a backup, a dump) holds none of them.
//!
//! A sealed value is `1 || nonce (12 bytes, random) || ciphertext || tag`.
//! The value's context (for a project secret, `project/NAME`) is the
//! authenticated data: a sealed value moved to another row does not open.

use std::fmt;

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The format version written first in every sealed value.
const VERSION: u8 = 1;
/// Key length: AES-256.
pub const KEY_LEN: usize = 32;

/// A key that seals and opens values. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKey([u8; KEY_LEN]);

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(***)")
    }
}

/// Why a sealed value does not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("not a sealed value (too short or unknown format)")]
    Malformed,
    #[error("it was sealed with another key, or changed since")]
    WrongKey,
}

impl SealKey {
    /// Reads a key written as 64 hexadecimal digits or as the base64 of 32
    /// bytes (what `gantry secrets key` prints).
    pub fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bytes = if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|e| e.to_string())?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| {
                    format!(
                        "a secrets key is {KEY_LEN} bytes, written as 64 hex digits or in base64"
                    )
                })?
        };
        let key: [u8; KEY_LEN] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "a secrets key is {KEY_LEN} bytes, this one is {} (64 hex digits or base64)",
                b.len()
            )
        })?;
        Ok(Self(key))
    }

    /// A new random key, as 64 hexadecimal digits.
    pub fn generate_text() -> Result<String, String> {
        let mut key = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| "no randomness available".to_owned())?;
        Ok(hex::encode(key))
    }

    fn aead(&self) -> LessSafeKey {
        // Cannot fail: the key has AES-256's length.
        #[allow(clippy::expect_used)]
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("a 32-byte key"))
    }

    /// Seals `value` for `context`; `None` only when the system has no
    /// randomness for the nonce.
    pub fn seal(&self, context: &str, value: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut data = value.to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + data.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Some(out)
    }

    /// Opens what [`SealKey::seal`] sealed for the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let (&version, rest) = sealed.split_first().ok_or(OpenError::Malformed)?;
        if version != VERSION || rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(OpenError::Malformed);
        }
        let (nonce, data) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Malformed)?;
        let mut data = data.to_vec();
        let plain = self
            .aead()
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut data)
            .map_err(|_| OpenError::WrongKey)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SealKey {
        SealKey::from_text(&"ab".repeat(32)).expect("hex key")
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let sealed = key()
            .seal("web/API_TOKEN", b"s3cret-value")
            .expect("sealed");
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(
            key().open("web/API_TOKEN", &sealed).expect("opens"),
            b"s3cret-value"
        );
        assert_eq!(
            key().open("api/API_TOKEN", &sealed),
            Err(OpenError::WrongKey),
            "another row"
        );
        let other = SealKey::from_text(&"cd".repeat(32)).expect("key");
        assert_eq!(
            other.open("web/API_TOKEN", &sealed),
            Err(OpenError::WrongKey)
        );
        let mut changed = sealed.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        assert_eq!(
            key().open("web/API_TOKEN", &changed),
            Err(OpenError::WrongKey)
        );
        assert_eq!(key().open("x", &sealed[..10]), Err(OpenError::Malformed));
        assert_eq!(key().open("x", &[]), Err(OpenError::Malformed));
        // A fresh nonce each time.
        assert_ne!(key().seal("c", b"v"), key().seal("c", b"v"));
    }

    #[test]
    fn keys_are_read_from_hex_or_base64() {
        let generated = SealKey::generate_text().expect("random");
        assert_eq!(generated.len(), 64);
        assert!(SealKey::from_text(&generated).is_ok());
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(SealKey::from_text(&b64).is_ok());
        for bad in ["", "abc", &"ab".repeat(31), "not base64 at all!"] {
            assert!(SealKey::from_text(bad).is_err(), "{bad}");
        }
        assert_eq!(format!("{:?}", key()), "SealKey(***)");
    }
}
