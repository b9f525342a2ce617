-- Owners and fixed search_path, re-applied after every `mailgend db migrate`
-- (not a numbered migration: a later migration that replaces a function
-- would reset its search_path, and databases migrated by earlier versions
-- need the same fix).
--
-- intelmq-mailgen's sql/notifications.sql creates its tables and functions
-- after `SET ROLE eventdb_owner`, so eventdb_owner owns them. Run as a
-- superuser (which the install docs allow), our migrations made the
-- superuser their owner instead, and with it the SECURITY DEFINER trigger
-- function that IntelMQ's inserts run: superuser rights for every insert.
-- Here intelmq-mailgen's objects and mailgend's own go to eventdb_owner,
-- when the migrating role may give them away (a superuser, or a member of
-- eventdb_owner); otherwise they stay with the migrating role, which is
-- then no superuser. IntelMQ's `events` table and the database itself are
-- left as the administrator set them up.
--
-- Every SECURITY DEFINER function among them gets a fixed search_path (its
-- own schema, then pg_temp), so a caller's search_path cannot substitute
-- objects the function uses.
DO $$
DECLARE
    home TEXT := current_schema();
    may_give BOOLEAN := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                        OR pg_has_role(current_user, 'eventdb_owner', 'MEMBER');
    obj RECORD;
BEGIN
    IF may_give THEN
        FOR obj IN
            SELECT c.oid::regclass AS name
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p')
               AND ((n.nspname = home AND c.relname IN ('ticket_day', 'sent', 'directives'))
                    OR n.nspname = 'mailgend')
               AND pg_get_userbyid(c.relowner) <> 'eventdb_owner'
        LOOP
            -- Sequences owned by a column (sent_id_seq, ...) follow.
            EXECUTE format('ALTER TABLE %s OWNER TO eventdb_owner', obj.name);
        END LOOP;
        FOR obj IN
            SELECT p.oid::regprocedure AS sig
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE ((n.nspname = home
                     AND p.proname IN ('json_object_as_text_array', 'insert_directive',
                                       'directives_from_extra',
                                       'events_insert_directives_for_row'))
                    OR n.nspname = 'mailgend')
               AND pg_get_userbyid(p.proowner) <> 'eventdb_owner'
        LOOP
            EXECUTE format('ALTER FUNCTION %s OWNER TO eventdb_owner', obj.sig);
        END LOOP;
        IF (SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'mailgend')
           <> 'eventdb_owner' THEN
            ALTER SCHEMA mailgend OWNER TO eventdb_owner;
        END IF;
    END IF;
    FOR obj IN
        SELECT p.oid::regprocedure AS sig, n.nspname AS schema
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE p.prosecdef
           -- Only what this role may alter, and only where it is missing.
           AND pg_has_role(current_user, p.proowner, 'MEMBER')
           AND NOT coalesce(p.proconfig @> ARRAY[format('search_path=%I, pg_temp', n.nspname)], FALSE)
           AND ((n.nspname = home
                 AND p.proname IN ('json_object_as_text_array', 'insert_directive',
                                   'directives_from_extra',
                                   'events_insert_directives_for_row'))
                OR n.nspname = 'mailgend')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', obj.sig, obj.schema);
    END LOOP;
END
$$;
