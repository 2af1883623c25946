-- Outgoing calls become a leased queue (gantry-queue): a call waits, is
-- claimed by a sender under a lease (running), then is sent or given up. A
-- claim is an attempt, so `attempt` replaces `attempts`.
ALTER TABLE outbound ADD COLUMN state TEXT NOT NULL DEFAULT 'waiting';
ALTER TABLE outbound ADD COLUMN owner TEXT;
ALTER TABLE outbound ADD COLUMN lease_until TIMESTAMPTZ;
ALTER TABLE outbound RENAME COLUMN attempts TO attempt;
UPDATE outbound SET state = CASE WHEN sent_at IS NOT NULL THEN 'sent'
                                 WHEN gave_up THEN 'gave_up'
                                 ELSE 'waiting' END;
DROP INDEX outbound_pending;
DROP INDEX outbound_key;
CREATE INDEX outbound_open ON outbound (id) WHERE state IN ('waiting', 'running');
CREATE INDEX outbound_key ON outbound (key, id) WHERE state IN ('waiting', 'running');
