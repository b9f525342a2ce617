-- Bounces traced back to their tickets (issue 19): every delivery report
-- `mailgend route` received at a VERP address (`bounces+<ticket>-<mac>@…`,
-- src/notify/verp.rs), one row per failed or delayed recipient.
--
-- `sent_id` links intelmq-mailgen's `sent` row of the ticket when there is
-- one (constituency copies have none; their ticket is in
-- mailgend.sent_mail). ON DELETE SET NULL: an operator pruning `sent`
-- keeps the bounce with its ticket. Remote text is bounded: the router
-- cuts the diagnostic to 1,000 characters, the other fields to 255.

CREATE TABLE IF NOT EXISTS mailgend.bounce (
    id BIGSERIAL PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    ticket VARCHAR(18) NOT NULL,
    sent_id BIGINT REFERENCES sent (id) ON DELETE SET NULL,
    recipient TEXT CHECK (length(recipient) <= 255),
    status VARCHAR(16) NOT NULL,
    class TEXT NOT NULL CHECK (class IN ('permanent', 'temporary')),
    diagnostic TEXT CHECK (length(diagnostic) <= 1000),
    reporting_mta TEXT CHECK (length(reporting_mta) <= 255),
    message_id TEXT CHECK (length(message_id) <= 255)
);
-- `mailgend bounces --since`, `mailgend status --bounces`.
CREATE INDEX IF NOT EXISTS bounce_received_at_idx ON mailgend.bounce (received_at);
-- `--recipient` and the per-recipient policy (case-insensitive, as
-- addresses are compared).
CREATE INDEX IF NOT EXISTS bounce_recipient_idx
    ON mailgend.bounce (lower(recipient), received_at);
CREATE INDEX IF NOT EXISTS bounce_ticket_idx ON mailgend.bounce (ticket);

GRANT SELECT, INSERT ON mailgend.bounce TO eventdb_send_notifications;
GRANT USAGE ON SEQUENCE mailgend.bounce_id_seq TO eventdb_send_notifications;
