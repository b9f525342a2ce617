-- The intelmq-mailgen objects of the events database (reference spec §2).
--
-- Other tools (Fody, IntelMQ's rules and output bots, intelmq-mailgen
-- itself) read and write these objects, so names, types, indexes and grants
-- are the same as intelmq-mailgen's `sql/notifications.sql`. Unlike that
-- file, every statement here is idempotent: `mailgend db migrate` may run on
-- a fresh database, on one where intelmq-mailgen's SQL was applied before,
-- and again after an upgrade. Existing objects are never dropped or altered,
-- except the trigger functions, which are replaced by equivalent bodies that
-- also accept an `extra` column of type json (older IntelMQ deployments).
--
-- Requires IntelMQ's `events` table (created by `intelmq_psql_initdb`).

-- Roles are cluster-wide: two databases migrated at once may both try to
-- create them, so a concurrent creation is not an error.
DO $$
DECLARE
    r TEXT;
BEGIN
    FOREACH r IN ARRAY ARRAY['eventdb_owner', 'eventdb_insert', 'eventdb_send_notifications'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOINHERIT NOCREATEDB CREATEROLE', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                    WHERE t.typname = 'ip_endpoint' AND n.nspname = current_schema()) THEN
        CREATE TYPE ip_endpoint AS ENUM ('source', 'destination');
    END IF;
END
$$;

CREATE SEQUENCE IF NOT EXISTS intelmq_ticket_seq MINVALUE 10000001;
-- The daily restart (ALTER SEQUENCE ... RESTART) needs ownership, which is
-- why intelmq-mailgen hands the sequence to the sending role.
DO $$
BEGIN
    IF (SELECT r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
         WHERE c.oid = 'intelmq_ticket_seq'::regclass) <> 'eventdb_send_notifications' THEN
        ALTER SEQUENCE intelmq_ticket_seq OWNER TO eventdb_send_notifications;
    END IF;
END
$$;

-- A single-row table: the day intelmq_ticket_seq was last restarted for.
CREATE TABLE IF NOT EXISTS ticket_day (
    initialized_for_day DATE
);
INSERT INTO ticket_day (initialized_for_day)
SELECT DATE '2016-01-01'
 WHERE NOT EXISTS (SELECT 1 FROM ticket_day);

CREATE TABLE IF NOT EXISTS sent (
    id BIGSERIAL UNIQUE PRIMARY KEY,
    intelmq_ticket VARCHAR(18) UNIQUE NOT NULL,
    sent_at TIMESTAMP WITH TIME ZONE
);

CREATE TABLE IF NOT EXISTS directives (
    id BIGSERIAL UNIQUE PRIMARY KEY,
    events_id BIGINT NOT NULL,
    sent_id BIGINT,

    medium VARCHAR(100) NOT NULL,
    recipient_address VARCHAR(100) NOT NULL,
    template_name VARCHAR(100) NOT NULL,
    notification_format VARCHAR(100) NOT NULL,
    event_data_format VARCHAR(100) NOT NULL,
    aggregate_identifier TEXT[][],
    notification_interval INTERVAL NOT NULL,
    endpoint ip_endpoint NOT NULL,

    inserted_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,

    FOREIGN KEY (events_id) REFERENCES events(id) ON DELETE CASCADE,
    FOREIGN KEY (sent_id) REFERENCES sent(id) ON DELETE CASCADE
);

CREATE INDEX IF NOT EXISTS directives_grouping_inserted_at_idx
          ON directives (recipient_address, template_name,
                         notification_format, event_data_format,
                         aggregate_identifier, inserted_at);
CREATE INDEX IF NOT EXISTS directives_events_id_idx
          ON directives (events_id);
CREATE INDEX IF NOT EXISTS directives_sent_id_idx
          ON directives (sent_id);

-- pg_trgm is a trusted extension: the database owner may create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX IF NOT EXISTS directives_recipient_group_idx
          ON directives USING gist (
            (json_object(aggregate_identifier) ->> 'recipient_group')
            gist_trgm_ops
          );

-- The aggregate identifier as a 2-D text array of [key, value] pairs sorted
-- by key. Values are converted with jsonb_each_text, so 123 and "123" are
-- equal: this is intelmq-mailgen's grouping rule and must stay so.
CREATE OR REPLACE FUNCTION json_object_as_text_array(obj JSONB)
RETURNS TEXT[][]
AS $$
DECLARE
    arr TEXT[][] = '{}'::TEXT[][];
    k TEXT;
    v TEXT;
BEGIN
    FOR k, v IN
        SELECT * FROM jsonb_each_text(obj) ORDER BY key
    LOOP
        arr := arr || ARRAY[ARRAY[k, v]];
    END LOOP;
    RETURN arr;
END
$$ LANGUAGE plpgsql IMMUTABLE;

CREATE OR REPLACE FUNCTION insert_directive(
    event_id BIGINT,
    directive JSONB,
    endpoint ip_endpoint
) RETURNS VOID
AS $$
DECLARE
    medium TEXT := directive ->> 'medium';
    recipient_address TEXT := directive ->> 'recipient_address';
    template_name TEXT := directive ->> 'template_name';
    notification_format TEXT := directive ->> 'notification_format';
    event_data_format TEXT := directive ->> 'event_data_format';
    aggregate_identifier TEXT[][]
        := json_object_as_text_array(directive -> 'aggregate_identifier');
    notification_interval interval
        := coalesce(((directive ->> 'notification_interval') :: INT)
                    * interval '1 second',
                    interval '0 second');
BEGIN
    IF medium IS NOT NULL
       AND recipient_address IS NOT NULL
       AND template_name IS NOT NULL
       AND notification_format IS NOT NULL
       AND event_data_format IS NOT NULL
       AND notification_interval IS NOT NULL
       AND notification_interval != interval '-1 second'
    THEN
        INSERT INTO directives (events_id,
                                medium,
                                recipient_address,
                                template_name,
                                notification_format,
                                event_data_format,
                                aggregate_identifier,
                                notification_interval,
                                endpoint)
        VALUES (event_id,
                medium,
                recipient_address,
                template_name,
                notification_format,
                event_data_format,
                aggregate_identifier,
                notification_interval,
                endpoint);
    END IF;
END
$$ LANGUAGE plpgsql VOLATILE;

CREATE OR REPLACE FUNCTION directives_from_extra(
    event_id BIGINT,
    extra JSONB
) RETURNS VOID
AS $$
DECLARE
    json_directives JSONB := extra -> 'certbund' -> 'source_directives';
    directive JSONB;
BEGIN
    IF json_directives IS NOT NULL AND jsonb_typeof(json_directives) = 'array' THEN
        FOR directive
         IN SELECT * FROM jsonb_array_elements(json_directives) LOOP
            PERFORM insert_directive(event_id, directive, 'source');
        END LOOP;
    END IF;
END
$$ LANGUAGE plpgsql VOLATILE;

-- Older IntelMQ deployments have `extra json`.
CREATE OR REPLACE FUNCTION directives_from_extra(
    event_id BIGINT,
    extra JSON
) RETURNS VOID
AS $$
BEGIN
    PERFORM directives_from_extra(event_id, extra::jsonb);
END
$$ LANGUAGE plpgsql VOLATILE;

CREATE OR REPLACE FUNCTION events_insert_directives_for_row()
RETURNS TRIGGER
AS $$
BEGIN
    -- The cast makes this work whether "extra" is json or jsonb.
    PERFORM directives_from_extra(NEW.id, NEW.extra::jsonb);
    RETURN NEW;
END
$$ LANGUAGE plpgsql VOLATILE EXTERNAL SECURITY DEFINER;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgname = 'events_insert_directive_trigger'
                      AND tgrelid = 'events'::regclass) THEN
        CREATE TRIGGER events_insert_directive_trigger
        AFTER INSERT ON events
        FOR EACH ROW
        EXECUTE PROCEDURE events_insert_directives_for_row();
    END IF;
END
$$;

GRANT INSERT ON events TO eventdb_insert;
DO $$
BEGIN
    -- IntelMQ creates events.id as BIGSERIAL; grant its sequence if it has one.
    IF pg_get_serial_sequence('events', 'id') IS NOT NULL THEN
        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO eventdb_insert',
                       pg_get_serial_sequence('events', 'id'));
    END IF;
END
$$;
GRANT EXECUTE ON FUNCTION events_insert_directives_for_row() TO eventdb_insert;
GRANT SELECT ON events TO eventdb_send_notifications;
GRANT USAGE ON intelmq_ticket_seq TO eventdb_send_notifications;
GRANT SELECT, UPDATE ON ticket_day TO eventdb_send_notifications;
GRANT SELECT, INSERT ON sent TO eventdb_send_notifications;
GRANT USAGE ON sent_id_seq TO eventdb_send_notifications;
GRANT SELECT, UPDATE ON directives TO eventdb_send_notifications;
