-- The outbox: mailgend's record of every mail it hands to SMTP.
--
-- A row is written and committed *before* the mail goes to SMTP (state
-- 'sending') and moved to mailgend.sent_mail in the same transaction that
-- marks the group's directives sent. After a crash, a 'sending' row whose
-- directives are still pending is a mail whose delivery is in doubt: SMTP
-- may or may not have accepted it. Recovery resends the stored bytes (same
-- Message-Id, same ticket) or holds it for the operator, as configured
-- (`mailgend.in_doubt`, see docs/operations.md).

CREATE TABLE IF NOT EXISTS mailgend.outbox (
    id BIGSERIAL PRIMARY KEY,
    ticket VARCHAR(18) NOT NULL,
    message_id TEXT NOT NULL,
    -- The directives this mail marks sent (empty for constituency copies,
    -- which are recorded here but never mark anything).
    directive_ids BIGINT[] NOT NULL,
    -- All directives of the group the mail belongs to.
    group_directive_ids BIGINT[] NOT NULL,
    marks_sent BOOLEAN NOT NULL,
    envelope_from TEXT NOT NULL,
    envelope_to TEXT[] NOT NULL,
    -- The exact message; cleared once SMTP accepted it.
    message BYTEA,
    -- The Date header: becomes sent.sent_at.
    sent_at TIMESTAMPTZ NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('sending', 'retry', 'accepted', 'failed', 'held', 'discarded')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    instance TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The outbox holds only mails not yet accepted (in flight, in doubt, held,
-- waiting for a retry, failed): a handful of live rows, but every mail
-- passes through it, so it churns, and the claim's look-up scans it.
-- Autovacuum visits it after every 5,000 dead rows instead of after a
-- fifth of its size: in a run over a million events the dead rows had made
-- that scan take 100 ms per group. Accepted mails move to
-- mailgend.sent_mail in the transaction that marks their directives sent.
ALTER TABLE mailgend.outbox SET (autovacuum_vacuum_scale_factor = 0,
                                 autovacuum_vacuum_threshold = 5000);

CREATE TABLE IF NOT EXISTS mailgend.sent_mail (
    id BIGINT PRIMARY KEY,
    ticket VARCHAR(18) NOT NULL,
    message_id TEXT NOT NULL,
    directive_ids BIGINT[] NOT NULL,
    group_directive_ids BIGINT[] NOT NULL,
    envelope_to TEXT[] NOT NULL,
    sent_at TIMESTAMPTZ NOT NULL,
    attempts INTEGER NOT NULL,
    instance TEXT NOT NULL,
    accepted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sent_mail_accepted_at_idx ON mailgend.sent_mail (accepted_at);
CREATE INDEX IF NOT EXISTS sent_mail_ticket_idx ON mailgend.sent_mail (ticket);
GRANT SELECT, INSERT, DELETE ON mailgend.sent_mail TO eventdb_send_notifications;

GRANT SELECT, INSERT, UPDATE, DELETE ON mailgend.outbox TO eventdb_send_notifications;
GRANT USAGE ON SEQUENCE mailgend.outbox_id_seq TO eventdb_send_notifications;

-- Wake-ups: a NOTIFY per statement that inserts directives, so `mailgend
-- run` learns of new work at once. The payload is empty; listeners rescan.
CREATE OR REPLACE FUNCTION mailgend.notify_directives_inserted()
RETURNS TRIGGER
AS $$
BEGIN
    PERFORM pg_notify('mailgend_directives', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgname = 'mailgend_notify_directives'
                      AND tgrelid = 'directives'::regclass) THEN
        CREATE TRIGGER mailgend_notify_directives
        AFTER INSERT ON directives
        FOR EACH STATEMENT
        EXECUTE FUNCTION mailgend.notify_directives_inserted();
    END IF;
END
$$;
