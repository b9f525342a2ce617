//! The database side against a real PostgreSQL 15: `db migrate`, the
//! directive trigger, the pending selection and grouping (spec §1–§3), and
//! ticket numbers (spec §4).

mod common;

use chrono::NaiveDate;
use common::{directive, event_fields, EnvOptions, TestEnv};
use mailgend::notify::directive::{claim, pending_groups, Claim};
use mailgend::notify::ticket::{self, TicketError};
use mailgend::sandbox::ExtraType;
use serde_json::json;

#[tokio::test]
async fn migrate_is_idempotent_and_creates_the_mailgen_objects() {
    let env = TestEnv::new().await;
    let mut client = env.client().await;
    // Second run: nothing to do. Third run with our bookkeeping removed, as
    // on a database where intelmq-mailgen's SQL created the objects before:
    // every statement must accept what exists.
    let report = mailgend::notify::db::migrate::migrate(&mut client)
        .await
        .unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    client
        .batch_execute("DELETE FROM mailgend.schema_migrations")
        .await
        .unwrap();
    let report = mailgend::notify::db::migrate::migrate(&mut client)
        .await
        .unwrap();
    assert_eq!(
        report.applied.len(),
        mailgend::notify::db::migrate::MIGRATIONS.len()
    );

    let one_row: i64 = client
        .query_one("SELECT count(*) FROM ticket_day", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one_row, 1, "ticket_day keeps exactly one row");
    let day: NaiveDate = client
        .query_one("SELECT initialized_for_day FROM ticket_day", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(day, NaiveDate::from_ymd_opt(2016, 1, 1).unwrap());

    let indexes: Vec<String> = client
        .query(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'directives' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for idx in [
        "directives_events_id_idx",
        "directives_grouping_inserted_at_idx",
        "directives_recipient_group_idx",
        "directives_sent_id_idx",
    ] {
        assert!(indexes.contains(&idx.to_string()), "{idx} in {indexes:?}");
    }
    let roles: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname IN \
             ('eventdb_owner','eventdb_insert','eventdb_send_notifications')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(roles, 3);
    let min: i64 = client
        .query_one(
            "SELECT seqmin FROM pg_sequence WHERE seqrelid = 'intelmq_ticket_seq'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(min, 10000001);
    // ON DELETE CASCADE from events to directives.
    let id = env
        .insert_event(
            event_fields("192.0.2.1", 64496),
            json!([directive("a@example.net", "Open-Redis", 64496)]),
        )
        .await;
    client
        .execute("DELETE FROM events WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(env.pending_count().await, 0);
}

#[tokio::test]
async fn migrate_refuses_a_database_without_events() {
    let env = TestEnv::with(EnvOptions {
        migrate: false,
        ..Default::default()
    })
    .await;
    let mut client = env.client().await;
    client.batch_execute("DROP TABLE events").await.unwrap();
    let err = mailgend::notify::db::migrate::migrate(&mut client)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("\"events\" does not exist"),
        "{err}"
    );
}

async fn trigger_rows(extra: ExtraType) {
    let env = TestEnv::with(EnvOptions {
        extra,
        ..Default::default()
    })
    .await;
    let mut d_never = directive("x@example.net", "Open-Redis", 1);
    d_never["notification_interval"] = json!(-1);
    let mut d_no_interval = directive("y@example.net", "Open-Redis", 1);
    d_no_interval
        .as_object_mut()
        .unwrap()
        .remove("notification_interval");
    let mut d_no_medium = directive("z@example.net", "Open-Redis", 1);
    d_no_medium.as_object_mut().unwrap().remove("medium");
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([
            directive("a@example.net", "Open-Redis", 64496),
            d_never,
            d_no_interval,
            d_no_medium
        ]),
    )
    .await;
    let client = env.client().await;
    let rows = client
        .query(
            "SELECT recipient_address, EXTRACT(EPOCH FROM notification_interval)::int8, \
                    endpoint::text, array_to_json(aggregate_identifier)::text \
               FROM directives ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "a@example.net".to_string(),
                86400,
                "source".to_string(),
                r#"[["source.asn","64496"],["time.observation","2024-05-01T06:00:00+00:00"]]"#
                    .to_string()
            ),
            (
                "y@example.net".to_string(),
                0,
                "source".to_string(),
                r#"[["source.asn","1"],["time.observation","2024-05-01T06:00:00+00:00"]]"#
                    .to_string()
            ),
        ],
        "interval -1 and a missing medium create no row; a missing interval is 0"
    );
}

#[tokio::test]
async fn trigger_accepts_jsonb_extra() {
    trigger_rows(ExtraType::Jsonb).await;
}

#[tokio::test]
async fn trigger_accepts_json_extra() {
    trigger_rows(ExtraType::Json).await;
}

#[tokio::test]
async fn grouping_follows_the_five_keys() {
    let env = TestEnv::with(EnvOptions {
        extra: ExtraType::Json,
        ..Default::default()
    })
    .await;
    // 123 and "123" aggregate together (jsonb_each_text).
    let mut as_string = directive("a@example.net", "Open-Redis", 0);
    as_string["aggregate_identifier"]["source.asn"] = json!("64496");
    let mut longer = directive("a@example.net", "Open-Redis", 64496);
    longer["notification_interval"] = json!(172800);
    let e1 = env
        .insert_event(
            event_fields("192.0.2.1", 64496),
            json!([directive("a@example.net", "Open-Redis", 64496)]),
        )
        .await;
    let e2 = env
        .insert_event(event_fields("192.0.2.2", 64496), json!([as_string]))
        .await;
    let e3 = env
        .insert_event(event_fields("192.0.2.3", 64496), json!([longer]))
        .await;
    // Different recipient, template, aggregate: separate groups.
    env.insert_event(
        event_fields("192.0.2.4", 64496),
        json!([directive("b@example.net", "Open-Redis", 64496)]),
    )
    .await;
    env.insert_event(
        event_fields("192.0.2.5", 64497),
        json!([directive("a@example.net", "Open-Redis", 64497)]),
    )
    .await;
    env.insert_event(
        event_fields("192.0.2.6", 64496),
        json!([directive("a@example.net", "Open-SNMP", 64496)]),
    )
    .await;

    let client = env.client().await;
    let groups = pending_groups(&client, None).await.unwrap();
    assert_eq!(groups.len(), 4);
    let g = &groups[0];
    assert_eq!(g.key.recipient_address, "a@example.net");
    assert_eq!(
        g.event_ids.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![e1, e2, e3]
    );
    assert_eq!(
        g.notification_interval,
        chrono::Duration::seconds(172800),
        "largest interval"
    );
    assert_eq!(g.key.aggregate_identifier.get("source.asn"), Some("64496"));
    let newest: chrono::DateTime<chrono::Utc> = client
        .query_one(
            "SELECT max(inserted_at) FROM directives WHERE events_id = ANY($1)",
            &[&vec![e1, e2, e3]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(g.inserted_at, newest);
    assert!(g.last_sent.is_none());

    // last_sent: the sent_at of the most recently inserted sent directive
    // with the same keys.
    client
        .batch_execute(
            "INSERT INTO sent (intelmq_ticket, sent_at) VALUES ('20240101-10000001', '2024-01-01 10:00+00'); \
             UPDATE directives SET sent_id = currval('sent_id_seq') WHERE events_id = (SELECT min(events_id) FROM directives)",
        )
        .await
        .unwrap();
    env.insert_event(
        event_fields("192.0.2.9", 64496),
        json!([directive("a@example.net", "Open-Redis", 64496)]),
    )
    .await;
    let groups = pending_groups(&client, None).await.unwrap();
    let g = groups
        .iter()
        .find(|g| {
            g.key.recipient_address == "a@example.net"
                && g.key.template_name.ends_with("Open-Redis")
                && g.key.aggregate_identifier.get("source.asn") == Some("64496")
        })
        .unwrap();
    assert_eq!(g.event_ids.len(), 3, "the sent directive left the group");
    assert_eq!(
        g.last_sent.unwrap().to_rfc3339(),
        "2024-01-01T10:00:00+00:00"
    );
}

#[tokio::test]
async fn additional_directive_where_filters_directives_and_events() {
    let env = TestEnv::new().await;
    let mut f = event_fields("192.0.2.1", 64496);
    f["feed.name"] = json!("Special-Feed");
    env.insert_event(f, json!([directive("a@example.net", "Open-Redis", 64496)]))
        .await;
    env.insert_event(
        event_fields("192.0.2.2", 64497),
        json!([directive("b@example.org", "Open-Redis", 64497)]),
    )
    .await;
    let client = env.client().await;
    let all = pending_groups(&client, None).await.unwrap();
    assert_eq!(all.len(), 2);
    let by_directive = pending_groups(&client, Some("d3.recipient_address LIKE '%.org'"))
        .await
        .unwrap();
    assert_eq!(by_directive.len(), 1);
    assert_eq!(by_directive[0].key.recipient_address, "b@example.org");
    let by_event = pending_groups(&client, Some("events.\"feed.name\" = 'Special-Feed'"))
        .await
        .unwrap();
    assert_eq!(by_event.len(), 1);
    assert_eq!(by_event[0].key.recipient_address, "a@example.net");
}

#[tokio::test]
async fn a_claimed_group_is_busy_for_another_transaction() {
    let env = TestEnv::new().await;
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("a@example.net", "Open-Redis", 64496)]),
    )
    .await;
    let mut c1 = env.client().await;
    let mut c2 = env.client().await;
    let groups = pending_groups(&c1, None).await.unwrap();
    let t1 = c1.transaction().await.unwrap();
    assert_eq!(claim(&t1, &groups[0]).await.unwrap(), Claim::Claimed);
    let t2 = c2.transaction().await.unwrap();
    // Returns at once (SKIP LOCKED), no lock error.
    assert_eq!(claim(&t2, &groups[0]).await.unwrap(), Claim::Busy);
    t2.rollback().await.unwrap();
    t1.rollback().await.unwrap();
}

#[tokio::test]
async fn tickets_restart_each_day_and_refuse_a_future_day() {
    let env = TestEnv::new().await;
    let mut client = env.client().await;
    let today: NaiveDate = client
        .query_one("SELECT (now() AT TIME ZONE 'UTC')::date", &[])
        .await
        .unwrap()
        .get(0);
    let prefix = today.format("%Y%m%d").to_string();

    // ticket_day starts at 2016-01-01: the first draw rolls over.
    let tx = client.transaction().await.unwrap();
    assert_eq!(
        ticket::peek(&tx).await.unwrap().as_str(),
        format!("{prefix}-10000001")
    );
    let t1 = ticket::draw(&tx).await.unwrap();
    let t2 = ticket::draw(&tx).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(t1.as_str(), format!("{prefix}-10000001"));
    assert_eq!(t2.as_str(), format!("{prefix}-10000002"));
    assert_eq!(
        ticket::peek(&client).await.unwrap().as_str(),
        format!("{prefix}-10000003")
    );

    // Yesterday's day: the sequence restarts.
    client
        .batch_execute("UPDATE ticket_day SET initialized_for_day = current_date - 1")
        .await
        .unwrap();
    let t = ticket::draw(&client).await.unwrap();
    assert_eq!(t.as_str(), format!("{prefix}-10000001"));
    let day: NaiveDate = client
        .query_one("SELECT initialized_for_day FROM ticket_day", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(day, today);

    // A future day: refused, nothing consumed.
    client
        .batch_execute("UPDATE ticket_day SET initialized_for_day = current_date + 1")
        .await
        .unwrap();
    let before = env.ticket_seq_last_value().await;
    let err = ticket::draw(&client).await.unwrap_err();
    assert!(matches!(err, TicketError::DayInFuture { .. }), "{err}");
    assert_eq!(env.ticket_seq_last_value().await, before);
}

#[tokio::test]
async fn committed_draws_roll_over_once_and_then_take_the_fast_path() {
    let env = TestEnv::new().await;
    let mut client = env.client().await;
    let cache = mailgend::notify::db::StatementCache::default();
    let tail = |t: &[mailgend::notify::ticket::Ticket]| -> Vec<String> {
        t.iter().map(|t| t.as_str()[9..].to_string()).collect()
    };
    // ticket_day is 2016-01-01: the slow path restarts the day.
    let a = ticket::draw_committed(&mut client, Some(&cache), 2)
        .await
        .unwrap();
    assert_eq!(tail(&a), ["10000001", "10000002"]);
    // Today now: the one-statement fast path continues the sequence.
    let b = ticket::draw_committed(&mut client, Some(&cache), 3)
        .await
        .unwrap();
    assert_eq!(tail(&b), ["10000003", "10000004", "10000005"]);
    assert_eq!(a[0].as_str()[..8], b[0].as_str()[..8]);
    // A day change is seen again, once.
    client
        .batch_execute("UPDATE ticket_day SET initialized_for_day = current_date - 1")
        .await
        .unwrap();
    let c = ticket::draw_committed(&mut client, Some(&cache), 1)
        .await
        .unwrap();
    assert_eq!(tail(&c), ["10000001"]);
    let d = ticket::draw_committed(&mut client, Some(&cache), 1)
        .await
        .unwrap();
    assert_eq!(tail(&d), ["10000002"]);
    // A future day is refused on the fast path too.
    client
        .batch_execute("UPDATE ticket_day SET initialized_for_day = current_date + 1")
        .await
        .unwrap();
    assert!(ticket::draw_committed(&mut client, Some(&cache), 1)
        .await
        .is_err());
}

/// `extra.KEY` columns load only those keys of `extra`; what a format sees
/// through `Event::extra` must be exactly what loading all of `extra`
/// gives, for objects, nulls, nested values, missing keys, a non-object
/// `extra` and no `extra`, with `extra` as json and as jsonb.
#[tokio::test]
async fn extra_keys_load_like_the_whole_object() {
    use mailgend::notify::directive::EventId;
    use mailgend::notify::event::EventColumns;
    for extra in [ExtraType::Jsonb, ExtraType::Json] {
        let env = TestEnv::with(EnvOptions {
            extra,
            ..EnvOptions::default()
        })
        .await;
        let client = env.client().await;
        let mut ids = Vec::new();
        for e in [
            r#"{"a": 1, "b": "x", "c": null, "n": {"z": [1, 2.5, "q"]}, "d'q": "quote"}"#,
            r#""a""#,
            r#"[1, 2]"#,
            r#"{}"#,
        ] {
            let id: i64 = client
                .query_one(
                    "INSERT INTO events (\"source.asn\", extra) VALUES (64496, $1::text::json) \
                     RETURNING id",
                    &[&e],
                )
                .await
                .unwrap()
                .get(0);
            ids.push(EventId(id));
        }
        let id: i64 = client
            .query_one(
                "INSERT INTO events (\"source.asn\") VALUES (64497) RETURNING id",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(EventId(id));
        let columns = EventColumns::read(&client).await.unwrap();
        let keys = ["a", "b", "c", "n", "zz", "d'q"];
        let some: Vec<String> = std::iter::once("source.asn".to_string())
            .chain(keys.iter().map(|k| format!("extra.{k}")))
            .collect();
        let whole = columns
            .load(
                &client,
                &ids,
                &["source.asn".to_string(), "extra".to_string()],
            )
            .await
            .unwrap();
        let filtered = columns.load(&client, &ids, &some).await.unwrap();
        assert_eq!(whole.len(), 5);
        assert_eq!(filtered.len(), 5);
        for (w, f) in whole.iter().zip(&filtered) {
            assert_eq!(w.id, f.id);
            assert_eq!(w.get("source.asn"), f.get("source.asn"));
            for k in keys {
                assert_eq!(w.extra(k), f.extra(k), "{extra:?} event {:?} key {k}", w.id);
            }
        }
        assert_eq!(filtered[0].extra("c"), Some(&serde_json::Value::Null));
        assert_eq!(filtered[0].extra("d'q"), Some(&json!("quote")));
        assert_eq!(filtered[1].extra("a"), None, "a JSON string has no keys");
        // Asking for the whole object and a key: the whole object.
        let both = columns
            .load(
                &client,
                &ids[..1],
                &["extra".to_string(), "extra.a".to_string()],
            )
            .await
            .unwrap();
        assert_eq!(both[0].get("extra"), whole[0].get("extra"));
        // A key of a column that is not JSON is refused, not guessed.
        let err = columns
            .load(&client, &ids, &["nosuch.a".to_string()])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nosuch.a"), "{err}");
    }
}

/// Owners as intelmq-mailgen's sql/notifications.sql gives them (it
/// creates its objects after `SET ROLE eventdb_owner`, notifications.sql
/// line 41), and a fixed search_path on every SECURITY DEFINER function,
/// also on a database migrated before this was done.
#[tokio::test]
async fn objects_belong_to_eventdb_owner_and_definer_functions_have_a_search_path() {
    let env = TestEnv::new().await;
    let mut client = env.client().await;
    async fn check(client: &tokio_postgres::Client) {
        let owners = client
            .query(
                "SELECT c.oid::regclass::text, pg_get_userbyid(c.relowner)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'S')
                    AND ((n.nspname = 'public' AND c.relname IN
                          ('ticket_day', 'sent', 'sent_id_seq', 'directives', 'directives_id_seq'))
                         OR n.nspname = 'mailgend')
                  ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        assert!(owners.len() >= 9, "{owners:?}");
        for r in &owners {
            let (name, owner): (String, String) = (r.get(0), r.get(1));
            assert_eq!(owner, "eventdb_owner", "owner of {name}");
        }
        let functions = client
            .query(
                "SELECT p.oid::regprocedure::text, pg_get_userbyid(p.proowner), p.prosecdef,
                        coalesce(array_to_string(p.proconfig, ';'), '')
                   FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                  WHERE (n.nspname = 'public' AND p.proname IN ('json_object_as_text_array',
                         'insert_directive', 'directives_from_extra',
                         'events_insert_directives_for_row'))
                     OR n.nspname = 'mailgend'",
                &[],
            )
            .await
            .unwrap();
        assert!(functions.len() >= 5, "{functions:?}");
        let mut definers = 0;
        for r in &functions {
            let (sig, owner, secdef, config): (String, String, bool, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            assert_eq!(owner, "eventdb_owner", "owner of {sig}");
            if secdef {
                definers += 1;
                assert_eq!(config, "search_path=public, pg_temp", "{sig}");
            }
        }
        assert_eq!(
            definers, 1,
            "events_insert_directives_for_row is the definer"
        );
        let schema_owner: String = client
            .query_one(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'mailgend'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(schema_owner, "eventdb_owner");
        let owner_is_super: bool = client
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = 'eventdb_owner'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!owner_is_super);
    }
    check(&client).await;

    // IntelMQ's inserting role still gets its directives through the
    // trigger, which now runs with eventdb_owner's rights.
    client
        .batch_execute(
            "SET ROLE eventdb_insert;
             INSERT INTO events (\"source.ip\", extra) VALUES ('192.0.2.7',
               '{\"certbund\": {\"source_directives\": [{\"medium\": \"email\",
                 \"recipient_address\": \"abuse@example.net\", \"template_name\": \"t\",
                 \"notification_format\": \"f\", \"event_data_format\": \"e\",
                 \"aggregate_identifier\": {}, \"notification_interval\": 0}]}}');
             RESET ROLE;",
        )
        .await
        .unwrap();
    assert_eq!(env.pending_count().await, 1);

    // A database migrated by an earlier version, as a superuser: its
    // objects belong to the superuser, the definer has no search_path.
    client
        .batch_execute(
            "ALTER TABLE ticket_day OWNER TO postgres;
             ALTER TABLE sent OWNER TO postgres;
             ALTER TABLE directives OWNER TO postgres;
             ALTER TABLE mailgend.outbox OWNER TO postgres;
             ALTER SCHEMA mailgend OWNER TO postgres;
             ALTER FUNCTION events_insert_directives_for_row() OWNER TO postgres;
             ALTER FUNCTION events_insert_directives_for_row() RESET search_path;",
        )
        .await
        .unwrap();
    let report = mailgend::notify::db::migrate::migrate(&mut client)
        .await
        .unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    check(&client).await;
}
