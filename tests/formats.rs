//! Formats, templates and tables without a database: template semantics
//! (cross-checked against python3's `string.Template`), safe template
//! lookup, CSV bytes (cross-checked against python3's `csv`), the decision
//! rules, copies, X-ARF, and loading the shipped and broken format files.
//!
//! The python3 cross-checks need `python3` on PATH; set
//! MAILGEND_SKIP_PYTHON=1 to skip them explicitly where it is missing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use serde_json::{json, Value};

use mailgend::config::Config;
use mailgend::notify::directive::{AggregateIdentifier, DirectiveId, EventId, Group, GroupKey};
use mailgend::notify::event::{Event, FieldValue};
use mailgend::notify::format::{
    DataLocation, Decision, FormatSet, Plan, RenderContext, RenderError,
};
use mailgend::notify::render::table::{json_text, python_float_repr, Column, TableFormat};
use mailgend::notify::render::template::{Template, TemplateError, TemplateStore};
use mailgend::notify::ticket::Ticket;

// ---------------------------------------------------------------------------
// helpers

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shipped_formats() -> PathBuf {
    manifest_dir().join("config/formats")
}

fn shipped_templates() -> PathBuf {
    manifest_dir().join("config/templates")
}

fn config_for(template_dir: &Path, script_dir: &Path, extra: Value) -> Config {
    let mut j = json!({
        "database": {"event": {"name": "intelmq-events", "username": "mailgen",
                                "password": "pw", "host": "localhost", "port": 5432}},
        "template_dir": template_dir, "script_directory": script_dir,
        "sender": "CERT <cert@example.org>",
        "smtp": {"host": "localhost", "port": 25},
        "openpgp": {"always_sign": false}
    });
    if let (Value::Object(base), Value::Object(more)) = (&mut j, extra) {
        base.extend(more);
    }
    Config::from_json_str(&j.to_string(), "test.conf").expect("test config")
}

/// Runs a python3 program with `input` on stdin and returns stdout, or
/// `None` when the cross-checks are explicitly skipped.
fn python(program: &str, input: &str) -> Option<String> {
    if std::env::var_os("MAILGEND_SKIP_PYTHON").is_some() {
        eprintln!("MAILGEND_SKIP_PYTHON set: python3 cross-check skipped");
        return None;
    }
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(program)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the cross-checks (or set MAILGEND_SKIP_PYTHON=1)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// A tiny deterministic generator, so failures are reproducible.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn t(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn group(
    nf: &str,
    edf: &str,
    template: &str,
    agg: &[(&str, &str)],
    inserted_at: DateTime<Utc>,
    interval: Duration,
    last_sent: Option<DateTime<Utc>>,
    events: &[i64],
) -> Group {
    let mut pairs: Vec<(String, String)> = agg
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    pairs.sort();
    Group {
        key: GroupKey {
            recipient_address: "abuse@example.net".into(),
            template_name: template.into(),
            notification_format: nf.into(),
            event_data_format: edf.into(),
            aggregate_identifier: AggregateIdentifier(pairs),
        },
        directive_ids: events.iter().map(|i| DirectiveId(i + 1000)).collect(),
        event_ids: events.iter().map(|i| EventId(*i)).collect(),
        inserted_at,
        notification_interval: interval,
        last_sent,
    }
}

fn simple_group(nf: &str, edf: &str, template: &str, agg: &[(&str, &str)]) -> Group {
    group(
        nf,
        edf,
        template,
        agg,
        t(2024, 5, 1, 0, 0, 0),
        Duration::zero(),
        None,
        &[1],
    )
}

fn event(id: i64, fields: &[(&str, FieldValue)]) -> Event {
    Event::new(
        EventId(id),
        fields.iter().map(|(k, v)| (k.to_string(), v.clone())),
    )
}

fn ticket(n: i64) -> Ticket {
    Ticket::new(NaiveDate::from_ymd_opt(2024, 5, 1).unwrap(), n)
}

fn send(d: Decision) -> Plan {
    match d {
        Decision::Send(p) => p,
        other => panic!("expected Send, got {other:?}"),
    }
}

/// A scratch format directory with the given files.
fn format_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

fn load(dir: &Path) -> Result<FormatSet, mailgend::notify::format::FormatLoadError> {
    let config = config_for(&shipped_templates(), dir, json!({}));
    FormatSet::load(dir, &config)
}

// ---------------------------------------------------------------------------
// templates

const PY_TEMPLATE: &str = r#"
import json, string, sys
class T(string.Template):
    idpattern = "[_a-z][_a-z0-9.]*"
class Every(dict):
    def __missing__(self, key):
        return "<" + key + ">"
cases = json.load(sys.stdin)
out = []
for text, mapping in cases:
    def run(m):
        try:
            return {"ok": T(text).substitute(m)}
        except KeyError as e:
            return {"key": e.args[0]}
        except ValueError as e:
            msg = str(e)
            line = int(msg.split("line ")[1].split(",")[0])
            col = int(msg.split("col ")[1])
            return {"invalid": [line, col]}
    out.append([run(mapping), run(Every(mapping))])
json.dump(out, sys.stdout)
"#;

#[test]
fn template_semantics_match_python_string_template() {
    let alphabet: Vec<char> = vec![
        '$', '$', '$', '$', '{', '}', '.', '_', 'a', 'b', 'A', '0', '1', ' ', '\n', '\r', 'x', 'é',
        '\u{212a}', '\u{17f}', '\u{131}', '\u{130}', '\u{2028}', '\x0b', '-',
    ];
    let mapping: BTreeMap<String, String> = [
        "a", "b", "a.b", "A", "ab", "_", "a.", "x", "a_b", "\u{17f}", "\u{212a}", "b1", "x.a",
    ]
    .iter()
    .map(|k| (k.to_string(), format!("[{k}]")))
    .collect();
    let mut rng = Lcg(42);
    let mut cases = Vec::new();
    for _ in 0..600 {
        let len = 1 + rng.below(12);
        let s: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        cases.push(s);
    }
    // Hand-picked edge cases.
    for s in [
        "$",
        "$$",
        "$$$",
        "${",
        "${}",
        "${a",
        "${a}",
        "${a.b}x",
        "$a.b.",
        "$a..",
        "${ a}",
        "$1",
        "$_",
        "$ab$b",
        "x\r\n$",
        "\n\n${a.}",
        "$A",
        "$\u{212a}",
        "${\u{17f}}",
    ] {
        cases.push(s.to_string());
    }
    let input: Vec<Value> = cases.iter().map(|c| json!([c, mapping])).collect();
    let Some(out) = python(PY_TEMPLATE, &Value::Array(input).to_string()) else {
        return;
    };
    let results: Vec<Value> = serde_json::from_str(&out).unwrap();
    let mut checked = 0;
    for (text, r) in cases.iter().zip(&results) {
        let (py, py_all) = (&r[0], &r[1]);
        let ours = Template::from_strings(text, "").and_then(|t| t.substitute(&mapping));
        match ours {
            Ok((s, _)) => assert_eq!(py["ok"].as_str(), Some(s.as_str()), "template {text:?}"),
            Err(TemplateError::UnknownPlaceholder { name, .. }) => {
                assert_eq!(py["key"].as_str(), Some(name.as_str()), "template {text:?}");
                assert!(py_all.get("ok").is_some(), "template {text:?}: {py_all}");
            }
            Err(TemplateError::InvalidPlaceholder { line, col, .. }) => {
                // We refuse the syntax when parsing; Python notices only
                // when it gets there, so compare with a mapping that knows
                // every name.
                assert_eq!(py_all["invalid"], json!([line, col]), "template {text:?}");
                assert!(py.get("ok").is_none(), "template {text:?}");
            }
            Err(e) => panic!("template {text:?}: unexpected {e}"),
        }
        checked += 1;
    }
    assert_eq!(checked, cases.len());
}

const PY_READ_TEMPLATE: &str = r#"
import json, sys, tempfile, os
texts = json.load(sys.stdin)
out = []
for text in texts:
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write(text.encode("utf-8"))
    with open(f.name, encoding="utf-8") as infile:
        subject = None
        guard = 0
        while not subject and guard < 1000:
            subject = infile.readline().strip()
            guard += 1
        out.append(None if not subject else [subject, infile.read().strip() + "\n"])
    os.unlink(f.name)
json.dump(out, sys.stdout)
"#;

#[test]
fn template_files_are_read_like_intelmq_mailgen() {
    let texts = [
        "Subject $a\nBody\n",
        "\n\n   \nSubj\r\n\r\n  body line\r\n\r\n",
        "S\rB1\rB2",
        "\x1c \t\nS\u{2028}x\n\u{3000}b\u{3000}\n",
        "only",
        "  \n \n",
        "",
        "\u{feff}S\nB",
    ];
    let Some(out) = python(PY_READ_TEMPLATE, &json!(texts).to_string()) else {
        return;
    };
    let py: Vec<Value> = serde_json::from_str(&out).unwrap();
    for (text, want) in texts.iter().zip(py) {
        match Template::from_file_text(text) {
            Ok(tmpl) => assert_eq!(
                json!([tmpl.subject_source(), tmpl.body_source()]),
                want,
                "{text:?}"
            ),
            Err(TemplateError::NoSubject) => assert!(want.is_null(), "{text:?}"),
            Err(e) => panic!("{text:?}: {e}"),
        }
    }
}

#[test]
fn template_store_refuses_names_outside_the_directory() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("templates");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("good"), "Subject ${ticket_number}\n\nBody\n").unwrap();
    std::fs::write(dir.join("sub/inner"), "Inner\nB\n").unwrap();
    std::fs::write(dir.join("empty"), "\n \n").unwrap();
    std::fs::write(root.path().join("secret"), "Secret\nstolen\n").unwrap();
    std::os::unix::fs::symlink(root.path().join("secret"), dir.join("link-out")).unwrap();
    std::os::unix::fs::symlink(dir.join("good"), dir.join("link-in")).unwrap();
    std::os::unix::fs::symlink(root.path(), dir.join("dir-out")).unwrap();

    let store = TemplateStore::new(&dir).unwrap();
    assert_eq!(
        store.get("good").unwrap().subject_source(),
        "Subject ${ticket_number}"
    );
    assert_eq!(store.get("sub/inner").unwrap().subject_source(), "Inner");
    assert_eq!(
        store.get("sub/../good").unwrap().subject_source(),
        "Subject ${ticket_number}"
    );
    assert!(
        store.get("link-in").is_ok(),
        "a symlink staying inside is fine"
    );

    for name in [
        "../secret",
        "sub/../../secret",
        "link-out",
        "dir-out/secret",
        "/etc/passwd",
        "good\0",
        "",
        ".",
        "sub",
    ] {
        let err = store.get(name).expect_err(name);
        assert!(
            matches!(
                err,
                TemplateError::UnsafeName { .. } | TemplateError::Read { .. }
            ),
            "{name:?}: {err}"
        );
    }
    assert!(matches!(
        store.get("link-out").unwrap_err(),
        TemplateError::UnsafeName { .. }
    ));
    assert!(matches!(
        store.get("../secret").unwrap_err(),
        TemplateError::UnsafeName { .. }
    ));
    assert!(matches!(
        store.get("empty").unwrap_err(),
        TemplateError::InTemplate { .. }
    ));
    // The directory itself must exist.
    assert!(TemplateStore::new(&root.path().join("nope")).is_err());
}

// ---------------------------------------------------------------------------
// CSV

fn all_kinds_events() -> Vec<Event> {
    let ts = t(2024, 5, 1, 6, 0, 0) + Duration::microseconds(123456);
    vec![
        event(
            1,
            &[
                ("source.asn", FieldValue::Int(64496)),
                ("source.ip", FieldValue::Text("192.0.2.1".into())),
                ("time.source", FieldValue::Timestamp(ts)),
                ("time.observation", FieldValue::Timestamp(ts)),
                ("feed.accuracy", FieldValue::Float(1500.0)),
                ("flag", FieldValue::Bool(true)),
                (
                    "extra",
                    FieldValue::Json(json!({
                        "v": 6.2, "n": null, "b": false, "i": 42, "big": 12345678901234567u64,
                        "f": 1.0e16, "s": "say \"hi\"\r\nnext", "o": {"a": 1, "b": [true, null, "x'y"]}
                    })),
                ),
            ],
        ),
        event(
            2,
            &[
                ("source.asn", FieldValue::Null),
                ("source.ip", FieldValue::Text("a,b\"c".into())),
                ("time.source", FieldValue::Null),
                (
                    "time.observation",
                    FieldValue::Timestamp(t(2024, 5, 1, 6, 0, 0)),
                ),
                ("feed.accuracy", FieldValue::Float(6.2)),
                ("flag", FieldValue::Bool(false)),
            ],
        ),
    ]
}

fn all_kinds_table() -> TableFormat {
    TableFormat {
        name: "t".into(),
        columns: [
            ("source.asn", "asn"),
            ("source.ip", "ip"),
            ("time.source", "timestamp"),
            ("time.observation", "observed"),
            ("feed.accuracy", "acc"),
            ("flag", "flag"),
            ("extra.v", "v"),
            ("extra.n", "n"),
            ("extra.b", "b"),
            ("extra.i", "i"),
            ("extra.big", "big"),
            ("extra.f", "f"),
            ("extra.s", "s \"q\""),
            ("extra.o", "o"),
            ("extra.missing", "missing"),
        ]
        .iter()
        .map(|(f, t)| Column::from_field(f, t))
        .collect(),
    }
}

#[test]
fn csv_bytes_for_every_value_kind() {
    let csv = all_kinds_table().to_csv(&all_kinds_events());
    let want = concat!(
        "\"asn\",\"ip\",\"timestamp\",\"observed\",\"acc\",\"flag\",\"v\",\"n\",\"b\",\"i\",",
        "\"big\",\"f\",\"s \"\"q\"\"\",\"o\",\"missing\"\r\n",
        "\"64496\",\"192.0.2.1\",\"2024-05-01 06:00:00\",\"2024-05-01 06:00:00.123456+00:00\",",
        "\"1500.0\",\"True\",\"6.2\",\"\",\"False\",\"42\",\"12345678901234567\",\"1e+16\",",
        "\"say \"\"hi\"\"\r\nnext\",\"{'a': 1, 'b': [True, None, \"\"x'y\"\"]}\",\"\"\r\n",
        "\"\",\"a,b\"\"c\",\"\",\"2024-05-01 06:00:00+00:00\",\"6.2\",\"False\",\"\",\"\",\"\",",
        "\"\",\"\",\"\",\"\",\"\",\"\"\r\n",
    );
    assert_eq!(csv, want);
    assert_eq!(
        all_kinds_table().event_columns(),
        vec![
            "source.asn",
            "source.ip",
            "time.source",
            "time.observation",
            "feed.accuracy",
            "flag",
            "extra.v",
            "extra.n",
            "extra.b",
            "extra.i",
            "extra.big",
            "extra.f",
            "extra.s",
            "extra.o",
            "extra.missing"
        ]
    );
}

const PY_CSV: &str = r#"
import csv, io, json, sys
rows = json.load(sys.stdin)
o = io.StringIO()
w = csv.writer(o, delimiter=",", quotechar='"', quoting=csv.QUOTE_ALL)
for r in rows:
    w.writerow(r)
sys.stdout.write(json.dumps(o.getvalue()))
"#;

#[test]
fn csv_writer_matches_python_csv_module() {
    let table = all_kinds_table();
    let events = all_kinds_events();
    let mut rows: Vec<Vec<String>> = vec![table
        .columns
        .iter()
        .map(|c| c.title().to_string())
        .collect()];
    for e in &events {
        rows.push(table.columns.iter().map(|c| c.cell(e)).collect());
    }
    // Awkward single values too.
    let odd = TableFormat {
        name: "odd".into(),
        columns: vec![Column::from_field("x", "x")],
    };
    let odd_events: Vec<Event> = ["", "\"", "\n", "a\rb", "\u{2028}", "tab\there", "nul\0x"]
        .iter()
        .enumerate()
        .map(|(i, s)| event(i as i64, &[("x", FieldValue::Text(s.to_string()))]))
        .collect();
    let Some(py) = python(PY_CSV, &json!(rows).to_string()) else {
        return;
    };
    let py: String = serde_json::from_str(&py).unwrap();
    assert_eq!(table.to_csv(&events), py);

    let mut odd_rows = vec![vec!["x".to_string()]];
    for e in &odd_events {
        odd_rows.push(vec![odd.columns[0].cell(e)]);
    }
    let py = python(PY_CSV, &json!(odd_rows).to_string()).unwrap();
    let py: String = serde_json::from_str(&py).unwrap();
    assert_eq!(odd.to_csv(&odd_events), py);
}

const PY_VALUES: &str = r#"
import json, sys
floats, docs = json.load(sys.stdin)
out_f = [repr(float.fromhex(h)) for h in floats]
def text(v):
    if v is None: return ""
    if v is True: return "True"
    if v is False: return "False"
    return str(v)
out_d = [text(json.loads(d)) for d in docs]
json.dump([out_f, out_d], sys.stdout)
"#;

#[test]
#[allow(clippy::excessive_precision)]
fn values_print_like_python() {
    let mut rng = Lcg(7);
    let mut floats: Vec<f64> = vec![
        0.1,
        1e16,
        1e15,
        9.999999999999999e15,
        1e-4,
        9.9e-5,
        123.456,
        5e-324,
        f64::MAX,
        1e22,
        -1.5,
        2.0f64.powi(60),
        0.3,
        100.0,
        1234567890123456.7,
    ];
    for _ in 0..400 {
        let bits = rng.next() << 31 ^ rng.next();
        let f = f64::from_bits(bits);
        if f.is_finite() {
            floats.push(f);
        }
        let g = (rng.next() % 1_000_000) as f64 / 10f64.powi(rng.below(12) as i32);
        floats.push(g);
    }
    let hex: Vec<String> = floats.iter().map(|f| hexfloat(*f)).collect();
    let docs = [
        "6.20",
        "1.5e3",
        "42",
        "0.0",
        "true",
        "null",
        "\"txt\"",
        "[1, 2.5, \"a\", null]",
        "{\"a\": {\"b\": [true, false]}, \"c\": \"it's \\\"q\\\"\"}",
        "[\"\\u00a0\\u200b\\n\\u007f\\ud83d\\ude00\\ue000\\u0085\\u00e9\\\\\"]",
        "{\"k'\": 1e300, \"z\": -1e-7}",
        "18446744073709551615",
        "-9223372036854775808",
    ];
    let Some(out) = python(PY_VALUES, &json!([hex, docs]).to_string()) else {
        return;
    };
    let out: Value = serde_json::from_str(&out).unwrap();
    for (f, want) in floats.iter().zip(out[0].as_array().unwrap()) {
        assert_eq!(python_float_repr(*f), want.as_str().unwrap(), "{f:e}");
    }
    for (d, want) in docs.iter().zip(out[1].as_array().unwrap()) {
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(json_text(&v), want.as_str().unwrap(), "{d}");
    }
}

/// Python's `float.hex` format, so the exact bits reach python3.
fn hexfloat(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0x0p+0"
        } else {
            "0x0p+0"
        }
        .into();
    }
    let bits = f.to_bits();
    let sign = if bits >> 63 == 1 { "-" } else { "" };
    let exp = ((bits >> 52) & 0x7ff) as i64;
    let mant = bits & ((1u64 << 52) - 1);
    if exp == 0 {
        format!("{sign}0x0.{mant:013x}p-1022")
    } else {
        format!("{sign}0x1.{mant:013x}p{:+}", exp - 1023)
    }
}

#[test]
fn big_json_integers_follow_serde_json_precision() {
    let v: Value = serde_json::from_str("123456789012345678901234567890").unwrap();
    let text = json_text(&v);
    // Without serde_json's arbitrary_precision (our build) the parser
    // already made a float of it; we print that float as Python would.
    assert!(v.is_f64());
    assert_eq!(text, "1.2345678901234568e+29");
}

// ---------------------------------------------------------------------------
// decide()

#[test]
fn format_sets_and_plans_cross_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<FormatSet>();
    assert_send_sync::<Plan>();
    assert_send_sync::<TemplateStore>();
}

#[test]
fn shipped_formats_load_cleanly() {
    let set = load(&shipped_formats()).unwrap_or_else(|e| panic!("{e}"));
    assert!(set.python_scripts().is_empty());
    let names = set.rule_names();
    // 10: 18 tables; 11: 2 waits + 3 tables; 13: 1 wait + 18 tables;
    // 20: demo; 21: 1 wait, 1 schema, 1 reject; 99: fallback.
    assert_eq!(names.len(), 18 + 5 + 19 + 1 + 3 + 1, "{names:?}");
    assert_eq!(names.first().unwrap(), "10shadowserver.toml#csv_malware");
    assert_eq!(names.last().unwrap(), "99fallback.toml#fallback");
    let store = TemplateStore::new(&shipped_templates()).unwrap();
    assert!(set.check_templates(&store).is_empty());
    let cols = set.event_columns_used();
    for c in [
        "extra",
        "source.ip",
        "time.source",
        "malware.hash.md5",
        "destination.fqdn",
    ] {
        assert!(cols.contains(c), "{c}");
    }
}

#[test]
fn python_scripts_are_recorded_not_run() {
    let d = format_dir(&[
        ("10a.toml", "[[format]]\nname = \"all\"\n"),
        ("10shadowservercsv.py", "raise SystemExit"),
        ("99fallback.py", ""),
        ("helper.py", ""),
        ("x10.toml", "this is not TOML and not loaded"),
        ("20b.toml~", "nor this"),
    ]);
    let set = load(d.path()).unwrap();
    let names: Vec<_> = set
        .python_scripts()
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["10shadowservercsv.py", "99fallback.py"]);
    assert_eq!(set.rule_names(), vec!["10a.toml#all"]);

    let only_py = format_dir(&[("10x.py", "")]);
    let err = load(only_py.path()).unwrap_err().to_string();
    assert!(
        err.contains("no format files") && err.contains("Python"),
        "{err}"
    );
}

#[test]
fn dispatch_by_directive_fields_in_file_order() {
    let set = load(&shipped_formats()).unwrap();
    let now = t(2024, 6, 1, 0, 0, 0);
    let name = |g: &Group| match set.decide(g, now) {
        Decision::Send(p) => p.format_name().to_string(),
        Decision::Postpone { format, .. } => format!("postpone {format}"),
        Decision::Error { format, .. } => format!("error {format}"),
        Decision::NoMatch => "none".into(),
    };
    let g = |nf: &str, edf: &str, tn: &str| simple_group(nf, edf, tn, &[("source.asn", "64496")]);
    assert_eq!(
        name(&g("shadowserver", "csv_Open-Redis", "x")),
        "10shadowserver.toml#csv_Open-Redis"
    );
    // A shadowserver format without a table falls through to the fallback.
    assert_eq!(
        name(&g("shadowserver", "csv_Unknown", "x")),
        "99fallback.toml#fallback"
    );
    assert_eq!(
        name(&g("ebury", "ebury_csv_attachment", "x")),
        "11malware-infection.toml#special-matters"
    );
    assert_eq!(
        name(&g("avalanche", "avalanche_csv_inline", "x")),
        "11malware-infection.toml#avalanche"
    );
    assert_eq!(
        name(&g("malware-infection", "malware-infection_csv_inline", "x")),
        "11malware-infection.toml#malware-infection"
    );
    assert_eq!(
        name(&g("malware-infection", "csv", "x")),
        "99fallback.toml#fallback"
    );
    assert_eq!(
        name(&g(
            "vulnerable-service",
            "v_csv_inline",
            "openredis_provider"
        )),
        "13vulnerable-service.toml#openredis"
    );
    assert_eq!(
        name(&g("vulnerable-service", "v_csv_inline", "openredis")),
        "13vulnerable-service.toml#openredis"
    );
    assert_eq!(
        name(&g("vulnerable-service", "v_csv_inline", "openredisx_y")),
        "13vulnerable-service.toml#vulnerable-service-default"
    );
    assert_eq!(
        name(&g("vulnerable-service", "v_csv", "openredis_provider")),
        "99fallback.toml#fallback"
    );
    assert_eq!(name(&g("demo", "anything", "x")), "20demo.toml#demo");
    assert_eq!(
        name(&g(
            "xarf",
            "bot-infection_0.2.0_unstable",
            "xarf-description-template"
        )),
        "21xarf.toml#bot-infection_0.2.0_unstable"
    );
    assert_eq!(
        name(&g("xarf", "other-schema", "xarf-description-template")),
        "error 21xarf.toml#unknown-schema"
    );
    // What 1.4's shipped TOML wrongly took for X-ARF is a fallback group,
    // as it is for the old tool (no script takes notification_format "any").
    assert_eq!(
        name(&g("any", "xarf", "bot-infection_0.2.0_unstable")),
        "99fallback.toml#fallback"
    );

    let p = send(set.decide(
        &g("vulnerable-service", "v_csv_attachment", "openredis_a"),
        now,
    ));
    assert_eq!(p.data_location(), Some(DataLocation::Attachment));
    let p = send(set.decide(&g("vulnerable-service", "v_csv_inline", "openredis_a"), now));
    assert_eq!(p.data_location(), Some(DataLocation::Inline));
    assert_eq!(
        p.event_columns(),
        vec![
            "source.asn",
            "source.ip",
            "time.source",
            "extra.redis_version"
        ]
    );
    assert_eq!(p.tickets_needed(5), 1);

    // Without a fallback, an unknown group matches nothing.
    let d = format_dir(&[(
        "10.toml",
        "[[format]]\nname = \"r\"\nmatch.notification_format = \"a\"\n",
    )]);
    let set = load(d.path()).unwrap();
    assert!(matches!(
        set.decide(&g("b", "c", "d"), now),
        Decision::NoMatch
    ));
    assert!(matches!(
        set.decide(&g("a", "c", "d"), now),
        Decision::Send(_)
    ));
}

#[test]
fn notification_interval_is_strictly_exceeded() {
    let set = load(&shipped_formats()).unwrap();
    let last = t(2024, 5, 1, 0, 0, 0);
    let interval = Duration::hours(24);
    let g = |last_sent| {
        group(
            "malware-infection",
            "malware-infection_csv_inline",
            "malware-infection",
            &[("source.asn", "64496")],
            t(2024, 4, 1, 0, 0, 0),
            interval,
            last_sent,
            &[1, 2],
        )
    };
    // Never sent: go.
    assert!(matches!(set.decide(&g(None), last), Decision::Send(_)));
    // Exactly at last_sent + interval: still held (the test is `<`).
    match set.decide(&g(Some(last)), last + interval) {
        Decision::Postpone {
            format,
            reason,
            until,
        } => {
            assert_eq!(format, "11malware-infection.toml#malware-infection-wait");
            assert!(reason.contains("interval"), "{reason}");
            let until = until.unwrap();
            assert_eq!(until, last + interval + Duration::microseconds(1));
            // and at `until` it goes.
            assert!(matches!(
                set.decide(&g(Some(last)), until),
                Decision::Send(_)
            ));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        set.decide(&g(Some(last)), last + interval + Duration::nanoseconds(1)),
        Decision::Send(_)
    ));
    assert!(matches!(
        set.decide(&g(Some(last)), last),
        Decision::Postpone { .. }
    ));
    // The fallback waits for the interval too (99fallback.py:38-39) ...
    let mut fb = g(Some(last));
    fb.key.notification_format = "other".into();
    assert!(matches!(
        set.decide(&fb, last),
        Decision::Postpone { format, .. } if format == "99fallback.toml#fallback"
    ));
    // ... the Shadowserver tables do not (10shadowservercsv.py:229-237).
    let mut ss = g(Some(last));
    ss.key.notification_format = "shadowserver".into();
    ss.key.event_data_format = "csv_Open-Redis".into();
    assert!(matches!(set.decide(&ss, last), Decision::Send(_)));
}

#[test]
fn minimum_ages_of_directive_and_observation() {
    let set = load(&shipped_formats()).unwrap();
    let inserted = t(2024, 5, 1, 12, 0, 0);
    let observed = "2024-05-01T11:00:00+00:00";
    let g = |agg: &[(&str, &str)]| {
        group(
            "vulnerable-service",
            "x_csv_inline",
            "openredis_provider",
            agg,
            inserted,
            Duration::zero(),
            None,
            &[1],
        )
    };
    let with_obs = g(&[("source.asn", "1"), ("time.observation", observed)]);
    // 14:59 after insertion: held by the directive age, and by the
    // observation (2 h after 11:00 = 13:00).
    match set.decide(&with_obs, inserted + Duration::seconds(899)) {
        Decision::Postpone { reason, until, .. } => {
            assert!(
                reason.contains("newest directive") && reason.contains("observation"),
                "{reason}"
            );
            assert_eq!(
                until,
                Some(t(2024, 5, 1, 13, 0, 0)),
                "the later of both ends"
            );
        }
        other => panic!("{other:?}"),
    }
    // Directive old enough (exactly 15 min is old enough: `age < min` holds
    // no more), observation not yet.
    match set.decide(&with_obs, inserted + Duration::minutes(15)) {
        Decision::Postpone { reason, until, .. } => {
            assert!(!reason.contains("newest directive"), "{reason}");
            assert_eq!(until, Some(t(2024, 5, 1, 13, 0, 0)));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        set.decide(&with_obs, t(2024, 5, 1, 13, 0, 0)),
        Decision::Send(_)
    ));
    assert!(matches!(
        set.decide(&with_obs, t(2024, 5, 1, 12, 59, 59)),
        Decision::Postpone { .. }
    ));
    // Without time.observation only the directive age applies.
    let no_obs = g(&[("source.asn", "1")]);
    match set.decide(&no_obs, inserted + Duration::minutes(14)) {
        Decision::Postpone { until, .. } => {
            assert_eq!(until, Some(inserted + Duration::minutes(15)))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        set.decide(&no_obs, inserted + Duration::minutes(15)),
        Decision::Send(_)
    ));
    // Fractions and other offsets parse; garbage is an error, not a fallback.
    let ready = t(2024, 5, 1, 12, 15, 0);
    for (raw, until) in [
        (
            "2024-05-01T10:15:00.250000+00:00",
            ready + Duration::milliseconds(250),
        ),
        (
            "2024-05-01T12:15:00.5+02:00",
            ready + Duration::milliseconds(500),
        ),
        ("2024-05-01T10:15:01Z", ready + Duration::seconds(1)),
    ] {
        let gg = g(&[("time.observation", raw)]);
        match set.decide(&gg, ready) {
            Decision::Postpone { until: u, .. } => assert_eq!(u, Some(until), "{raw}"),
            other => panic!("{raw}: {other:?}"),
        }
        assert!(matches!(set.decide(&gg, until), Decision::Send(_)), "{raw}");
    }
    let bad = g(&[("time.observation", "yesterday")]);
    match set.decide(&bad, t(2025, 1, 1, 0, 0, 0)) {
        Decision::Error { format, reason } => {
            assert_eq!(format, "13vulnerable-service.toml#wait");
            assert!(reason.contains("yesterday"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// rendering

fn redis_events() -> Vec<Event> {
    vec![
        event(
            1,
            &[
                ("source.asn", FieldValue::Int(64496)),
                ("source.ip", FieldValue::Text("192.0.2.1".into())),
                ("time.source", FieldValue::Timestamp(t(2024, 5, 1, 5, 0, 0))),
                ("extra", FieldValue::Json(json!({"redis_version": "7.2.4"}))),
            ],
        ),
        event(
            2,
            &[
                ("source.asn", FieldValue::Int(64496)),
                ("source.ip", FieldValue::Text("192.0.2.2".into())),
                (
                    "time.source",
                    FieldValue::Timestamp(t(2024, 5, 1, 5, 30, 0)),
                ),
                ("extra", FieldValue::Json(json!({"redis_version": 6.2}))),
            ],
        ),
    ]
}

#[test]
fn table_mail_with_constituency_copies() {
    let config = config_for(&shipped_templates(), &shipped_formats(), json!({}));
    let set = FormatSet::load(&shipped_formats(), &config).unwrap();
    let store = TemplateStore::new(&shipped_templates()).unwrap();
    let g = group(
        "shadowserver",
        "csv_Open-Redis",
        "shadowserver_csv_Open-Redis",
        &[("source.asn", "64496"), ("recipient_group", "Energy")],
        t(2024, 5, 1, 0, 0, 0),
        Duration::hours(24),
        None,
        &[1, 2],
    );
    let plan = send(set.decide(&g, t(2024, 5, 2, 0, 0, 0)));
    let events = redis_events();
    let tickets = [ticket(10000001)];
    let mails = plan
        .render(&RenderContext {
            group: &g,
            events: &events,
            tickets: &tickets,
            templates: &store,
            config: &config,
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mails.len(), 2);
    let (main, copy) = (&mails[0], &mails[1]);
    let csv = "\"asn\",\"ip\",\"timestamp\",\"version\"\r\n\
               \"64496\",\"192.0.2.1\",\"2024-05-01 05:00:00\",\"7.2.4\"\r\n\
               \"64496\",\"192.0.2.2\",\"2024-05-01 05:30:00\",\"6.2\"\r\n";
    assert_eq!(
        main.subject,
        "[CERT-Report#20240501-10000001] Open Redis servers about AS 64496"
    );
    assert!(main.mark_sent && main.envelope_to.is_none());
    assert_eq!(main.recipient, "abuse@example.net");
    assert!(main.body.contains(csv), "{}", main.body);
    assert!(main.body.contains("listed below"), "{}", main.body);
    assert!(main.body.contains("Affected systems"), "{}", main.body);
    assert!(main.attachments.is_empty());

    assert_eq!(copy.ticket, main.ticket);
    assert_eq!(copy.recipient, main.recipient, "header To unchanged");
    assert_eq!(
        copy.envelope_to,
        Some(vec!["energy-copies@cert.example".to_string()])
    );
    assert!(!copy.mark_sent);
    assert_eq!(copy.subject, main.subject);
    assert!(!copy.body.contains(csv), "the data is attached, not inline");
    assert!(
        copy.body.contains("listed in the attached file events.csv"),
        "{}",
        copy.body
    );
    assert!(!copy.body.contains("Affected systems"), "{}", copy.body);
    assert_eq!(copy.attachments.len(), 1);
    let a = &copy.attachments[0];
    assert_eq!(
        (
            a.subtype.as_str(),
            a.filename.as_str(),
            a.disposition_attachment
        ),
        ("csv", "events.csv", true)
    );
    assert_eq!(a.content, csv);

    // No recipient_group: no copies. Another group: no copies.
    for agg in [
        vec![("source.asn", "64496")],
        vec![("recipient_group", "Water")],
    ] {
        let mut g2 = g.clone();
        g2.key.aggregate_identifier = AggregateIdentifier(
            agg.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let mails = plan
            .render(&RenderContext {
                group: &g2,
                events: &events,
                tickets: &tickets,
                templates: &store,
                config: &config,
            })
            .unwrap();
        assert_eq!(mails.len(), 1);
    }
}

#[test]
fn render_errors_name_template_and_placeholder() {
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(
        tdir.path().join("uses-unknown"),
        "S ${ticket_number}\n\nHello ${nobody}\n",
    )
    .unwrap();
    let fdir = format_dir(&[("10.toml", "[[format]]\nname = \"r\"\n")]);
    let config = config_for(tdir.path(), fdir.path(), json!({}));
    let set = FormatSet::load(fdir.path(), &config).unwrap();
    let store = TemplateStore::new(tdir.path()).unwrap();
    let events = redis_events();
    let render = |template: &str, tickets: &[Ticket]| {
        let g = simple_group("a", "b", template, &[]);
        let plan = send(set.decide(&g, Utc::now()));
        plan.render(&RenderContext {
            group: &g,
            events: &events,
            tickets,
            templates: &store,
            config: &config,
        })
    };
    let err = render("uses-unknown", &[ticket(1)]).unwrap_err();
    assert!(matches!(err, RenderError::Template { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("10.toml#r") && msg.contains("uses-unknown") && msg.contains("${nobody}"),
        "{msg}"
    );
    let msg = render("missing", &[ticket(1)]).unwrap_err().to_string();
    assert!(msg.contains("missing"), "{msg}");
    let msg = render("../etc/passwd", &[ticket(1)])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("refused"), "{msg}");
    assert!(matches!(
        render("uses-unknown", &[]).unwrap_err(),
        RenderError::Tickets {
            needed: 1,
            given: 0,
            ..
        }
    ));
}

#[test]
fn tool_variables_win_over_aggregate_keys() {
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(
        tdir.path().join("tpl"),
        "T ${ticket_number} ${v}\n${events_as_csv}|${asn_or_cidr}\n",
    )
    .unwrap();
    let fdir = format_dir(&[(
        "10.toml",
        r#"
variables = { v = "from-variables", asn_or_cidr = "plain" }
[[format]]
name = "r"
columns = [{ field = "source.ip", title = "ip" }]
"#,
    )]);
    let config = config_for(tdir.path(), fdir.path(), json!({}));
    let set = FormatSet::load(fdir.path(), &config).unwrap();
    let store = TemplateStore::new(tdir.path()).unwrap();
    let g = simple_group(
        "a",
        "b",
        "tpl",
        &[
            ("ticket_number", "evil"),
            ("events_as_csv", "evil"),
            ("v", "from-aggregate"),
        ],
    );
    let plan = send(set.decide(&g, Utc::now()));
    let events = redis_events();
    let mails = plan
        .render(&RenderContext {
            group: &g,
            events: &events,
            tickets: &[ticket(10000002)],
            templates: &store,
            config: &config,
        })
        .unwrap();
    assert_eq!(mails[0].subject, "T 20240501-10000002 from-aggregate");
    assert_eq!(
        mails[0].body,
        "\"ip\"\r\n\"192.0.2.1\"\r\n\"192.0.2.2\"\r\n|plain\n"
    );
}

fn xarf_events() -> Vec<Event> {
    vec![
        event(
            5,
            &[
                ("source.ip", FieldValue::Text("192.0.2.5".into())),
                ("source.port", FieldValue::Int(4444)),
                ("source.asn", FieldValue::Int(64496)),
                ("time.source", FieldValue::Timestamp(t(2024, 5, 1, 6, 0, 0))),
                ("destination.ip", FieldValue::Null),
                (
                    "malware.name",
                    FieldValue::Text("evil\"\nCategory: fake\r\n---\n- x\u{2028}\u{1b}[31m".into()),
                ),
                (
                    "classification.taxonomy",
                    FieldValue::Text("malicious-code".into()),
                ),
            ],
        ),
        event(
            9,
            &[
                ("source.ip", FieldValue::Text("2001:db8::9".into())),
                (
                    "time.source",
                    FieldValue::Timestamp(t(2024, 5, 1, 7, 0, 0) + Duration::microseconds(5)),
                ),
            ],
        ),
    ]
}

/// The report parsed back as `key: value` lines (each line one key).
fn report_lines(report: &str) -> BTreeMap<String, String> {
    report
        .lines()
        .map(|l| {
            let (k, v) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn xarf_one_mail_and_ticket_per_event() {
    let config = config_for(
        &shipped_templates(),
        &shipped_formats(),
        json!({"xarf_reportdomain": "reports.example.org"}),
    );
    let set = FormatSet::load(&shipped_formats(), &config).unwrap();
    let store = TemplateStore::new(&shipped_templates()).unwrap();
    let g = group(
        "xarf",
        "bot-infection_0.2.0_unstable",
        "xarf-description-template",
        &[("recipient_group", "Energy")],
        t(2024, 5, 1, 0, 0, 0),
        Duration::zero(),
        None,
        &[5, 9],
    );
    let plan = send(set.decide(&g, t(2024, 5, 2, 0, 0, 0)));
    assert!(plan.is_xarf());
    let events = xarf_events();
    assert_eq!(plan.tickets_needed(events.len()), 2);
    let cols = plan.event_columns();
    for c in ["source.ip", "time.source", "malware.hash.md5"] {
        assert!(cols.iter().any(|x| x == c), "{c} in {cols:?}");
    }
    let tickets = [ticket(10000010), ticket(10000011)];
    let mails = plan
        .render(&RenderContext {
            group: &g,
            events: &events,
            tickets: &tickets,
            templates: &store,
            config: &config,
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mails.len(), 2, "one per event, no constituency copies");
    for (m, tk) in mails.iter().zip(&tickets) {
        assert_eq!(&m.ticket, tk);
        assert!(m.mark_sent);
        assert!(m.envelope_to.is_none());
        assert!(m.subject.contains(tk.as_str()), "{}", m.subject);
        assert_eq!(
            m.extra_headers,
            vec![
                ("X-ARF".to_string(), "PLAIN".to_string()),
                ("Auto-Submitted".to_string(), "auto-generated".to_string())
            ]
        );
        assert_eq!(m.attachments.len(), 1);
        let a = &m.attachments[0];
        assert_eq!(
            (
                a.subtype.as_str(),
                a.filename.as_str(),
                a.disposition_attachment
            ),
            ("plain", "report.txt", false)
        );
    }
    let r1 = &mails[0].attachments[0].content;
    let lines = report_lines(r1);
    assert_eq!(
        lines["Report-ID"],
        "\"20240501-10000010@reports.example.org\""
    );
    assert_eq!(lines["Reported-From"], "\"cert@example.org\"");
    assert_eq!(lines["Category"], "\"abuse\"");
    assert_eq!(lines["Report-Type"], "\"bot-infection\"");
    assert_eq!(lines["Date"], "\"2024-05-01T06:00:00+00:00\"");
    assert_eq!(lines["Source"], "\"192.0.2.5\"");
    assert_eq!(lines["Source-Port"], "4444");
    assert_eq!(lines["Source-ASN"], "64496");
    assert_eq!(lines["Attachment"], "\"none\"");
    assert_eq!(lines["Version"], "0.2");
    assert!(lines["User-Agent"].starts_with("\"mailgend "));
    assert!(lines["Schema-URL"].contains("abuse_bot-infection_0.2.0_unstable.json"));
    assert!(
        !lines.contains_key("Destination"),
        "NULL leaves the key out"
    );
    // The hostile value stays one quoted scalar on one line.
    assert_eq!(
        lines["Malware-Name"],
        r#""evil\"\nCategory: fake\r\n---\n- x\L\x1b[31m""#
    );
    assert_eq!(r1.lines().filter(|l| l.starts_with("Category")).count(), 1);
    assert!(r1.starts_with("Reported-From: "), "{r1}");
    // Second report: its own ticket; the sender domain when no report domain.
    let lines2 = report_lines(&mails[1].attachments[0].content);
    assert_eq!(
        lines2["Report-ID"],
        "\"20240501-10000011@reports.example.org\""
    );
    assert_eq!(lines2["Date"], "\"2024-05-01T07:00:00.000005+00:00\"");

    let plain = config_for(&shipped_templates(), &shipped_formats(), json!({}));
    let mails = plan
        .render(&RenderContext {
            group: &g,
            events: &events,
            tickets: &tickets,
            templates: &store,
            config: &plain,
        })
        .unwrap();
    assert_eq!(
        report_lines(&mails[1].attachments[0].content)["Report-ID"],
        "\"20240501-10000011@example.org\""
    );

    // A wrong number of tickets or a missing mandatory value is an error.
    let err = plan
        .render(&RenderContext {
            group: &g,
            events: &events,
            tickets: &tickets[..1],
            templates: &store,
            config: &config,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            RenderError::Tickets {
                needed: 2,
                given: 1,
                ..
            }
        ),
        "{err}"
    );
    let no_source = vec![event(
        3,
        &[("time.source", FieldValue::Timestamp(t(2024, 5, 1, 0, 0, 0)))],
    )];
    let err = plan
        .render(&RenderContext {
            group: &g,
            events: &no_source,
            tickets: &tickets[..1],
            templates: &store,
            config: &config,
        })
        .unwrap_err();
    match err {
        RenderError::Xarf { event, reason, .. } => {
            assert_eq!(event, EventId(3));
            assert!(reason.contains("Source"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn the_fallback_renders_its_inline_template() {
    let config = config_for(&shipped_templates(), &shipped_formats(), json!({}));
    let set = FormatSet::load(&shipped_formats(), &config).unwrap();
    let store = TemplateStore::new(&shipped_templates()).unwrap();
    let g = simple_group(
        "whatever",
        "csv",
        "does-not-exist",
        &[("source.asn", "64496")],
    );
    let plan = send(set.decide(&g, Utc::now()));
    assert_eq!(plan.format_name(), "99fallback.toml#fallback");
    assert_eq!(plan.template_name(&g), None);
    let events = vec![event(
        1,
        &[
            ("source.asn", FieldValue::Int(64496)),
            ("source.ip", FieldValue::Text("192.0.2.1".into())),
            ("time.source", FieldValue::Timestamp(t(2024, 5, 1, 5, 0, 0))),
            ("destination.port", FieldValue::Int(80)),
        ],
    )];
    assert_eq!(
        plan.event_columns(),
        vec![
            "source.asn",
            "source.ip",
            "time.source",
            "source.port",
            "destination.ip",
            "destination.port",
            "destination.fqdn",
            "protocol.transport"
        ]
    );
    let mails = plan
        .render(&RenderContext {
            group: &g,
            events: &events,
            tickets: &[ticket(10000003)],
            templates: &store,
            config: &config,
        })
        .unwrap();
    assert_eq!(mails[0].subject, "CB-Report#20240501-10000003");
    assert!(mails[0].body.ends_with(
        "Events:\n\"asn\",\"ip\",\"timestamp\",\"src_port\",\"dst_ip\",\"dst_port\",\"dst_host\",\"proto\"\r\n\
         \"64496\",\"192.0.2.1\",\"2024-05-01 05:00:00\",\"\",\"\",\"80\",\"\",\"\"\r\n"
    ), "{}", mails[0].body);
}

// ---------------------------------------------------------------------------
// load errors

#[test]
fn every_problem_of_broken_files_is_reported_with_file_key_and_line() {
    let d = format_dir(&[
        (
            "10broken.toml",
            r#"variables_file = "vars.json"
colums_titles = {}

[defaults]
postpone.min_directive_age = "15 minutes"

[[format]]
name = "a"
colums = ["source.ip"]

[[format]]
name = "b"
columns = ["source.ip", { field = "extra.x" }]
data_location = "sideways"
template = { subject = "bad $" , body = "" }

[[format]]
name = "c"
xarf.static = { Category = "abuse", Report-ID = "x" }
match.event_data_format = { starts = "x" }

[[format]]
name = "a"
"#,
        ),
        (
            "vars.json",
            r#"{"ok": "yes", "num": 5, "nested": {"a": "b"}}"#,
        ),
        ("20syntax.toml", "[[format]\nname = 1\n"),
        (
            "30types.toml",
            "inherit = \"no\"\n[[format]]\nname = 7\npostpone = 3\n",
        ),
    ]);
    let err = load(d.path()).unwrap_err();
    let problems = &err.0;
    let find = |file: &str, key: &str| {
        problems
            .iter()
            .find(|p| p.file.ends_with(file) && p.key == key)
            .unwrap_or_else(|| panic!("no problem for {file} {key}:\n{err}"))
    };
    let p = find("10broken.toml", "colums_titles");
    assert!(
        p.reason.contains("did you mean `column_titles`"),
        "{}",
        p.reason
    );
    assert_eq!(p.line, Some(2));
    assert_eq!(
        find("10broken.toml", "defaults.postpone.min_directive_age").line,
        Some(5)
    );
    let p = find("10broken.toml", "format[0].colums");
    assert!(p.reason.contains("did you mean `columns`"), "{}", p.reason);
    assert_eq!(p.line, Some(9));
    let p = find("10broken.toml", "format[1].columns[0]");
    assert!(p.reason.contains("no title"), "{}", p.reason);
    assert_eq!(p.line, Some(13));
    assert!(find("10broken.toml", "format[1].columns[1]")
        .reason
        .contains("title"));
    assert!(find("10broken.toml", "format[1].data_location")
        .reason
        .contains("sideways"));
    let p = find("10broken.toml", "format[1].template");
    assert!(p.reason.contains("invalid placeholder"), "{}", p.reason);
    assert!(find("10broken.toml", "format[2].xarf.static.Report-ID")
        .reason
        .contains("filled in by mailgend"));
    assert!(find("10broken.toml", "format[2].xarf")
        .reason
        .contains("mandatory"));
    assert!(
        find("10broken.toml", "format[2].match.event_data_format.starts")
            .reason
            .contains("unknown key")
    );
    assert!(find("10broken.toml", "format[3]")
        .reason
        .contains("second rule named"));
    assert!(find("vars.json", "num").reason.contains("must be strings"));
    assert!(find("vars.json", "nested")
        .reason
        .contains("must be strings"));
    let p = find("20syntax.toml", "");
    assert!(
        p.reason.contains("not valid TOML") && p.line == Some(1),
        "{p}"
    );
    assert!(find("30types.toml", "inherit")
        .reason
        .contains("true or false"));
    assert!(find("30types.toml", "format[0].name")
        .reason
        .contains("string"));
    assert!(find("30types.toml", "format[0].postpone")
        .reason
        .contains("table"));
    // Display carries everything an operator needs.
    let text = err.to_string();
    assert!(
        text.contains("10broken.toml:9: key `format[0].colums`: unknown key"),
        "{text}"
    );
}

#[test]
fn variables_files_with_sections_and_scope_rules() {
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(tdir.path().join("tpl"), "S ${a} ${b} ${c} ${shared}\nB\n").unwrap();
    let d = format_dir(&[
        ("v.json", r#"{"common": {"a": "A"}, "other": {"b": 1}}"#),
        (
            "00ctx.toml",
            "variables_file = { path = \"v.json\", section = \"common\" }\nvariables = { shared = \"S\" }\n",
        ),
        (
            "10rules.toml",
            "[defaults]\nvariables = { b = \"B\" }\n[[format]]\nname = \"r\"\nvariables = { c = \"C\" }\nmatch.notification_format = \"x\"\n",
        ),
        (
            "20later.toml",
            "[[format]]\nname = \"later\"\n",
        ),
        (
            "30fresh.toml",
            "inherit = false\n[[format]]\nname = \"fresh\"\n",
        ),
    ]);
    let config = config_for(tdir.path(), d.path(), json!({}));
    let set = FormatSet::load(d.path(), &config).unwrap_or_else(|e| panic!("{e}"));
    let store = TemplateStore::new(tdir.path()).unwrap();
    let events = redis_events();
    let subject = |nf: &str| {
        let g = simple_group(nf, "e", "tpl", &[]);
        let plan = send(set.decide(&g, Utc::now()));
        plan.render(&RenderContext {
            group: &g,
            events: &events,
            tickets: &[ticket(1)],
            templates: &store,
            config: &config,
        })
        .map(|m| m[0].subject.clone())
    };
    assert_eq!(subject("x").unwrap(), "S A B C S");
    // `later` sees the context (a, shared) but not 10's defaults or rule.
    let err = subject("y").unwrap_err().to_string();
    assert!(
        err.contains("${b}") && err.contains("20later.toml#later"),
        "{err}"
    );
    // A section whose values are not strings is refused.
    let bad = format_dir(&[
        ("v.json", r#"{"common": {"a": "A"}, "other": {"b": 1}}"#),
        ("00.toml", "variables_file = [\"v.json\", { path = \"v.json\", section = \"other\" }, { path = \"nope.json\" }]\n"),
    ]);
    let err = load(bad.path()).unwrap_err();
    let keys: Vec<_> = err
        .0
        .iter()
        .map(|p| {
            (
                p.file.rsplit('/').next().unwrap().to_string(),
                p.key.clone(),
            )
        })
        .collect();
    assert!(keys.contains(&("v.json".into(), "common".into())), "{err}");
    assert!(keys.contains(&("v.json".into(), "other.b".into())), "{err}");
    assert!(
        keys.contains(&("00.toml".into(), "variables_file[2]".into())),
        "{err}"
    );
}

#[test]
fn check_templates_reports_missing_named_templates() {
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(tdir.path().join("present"), "S\nB\n").unwrap();
    std::fs::write(tdir.path().join("broken"), "S $\nB\n").unwrap();
    let d = format_dir(&[(
        "10.toml",
        "[[format]]\nname = \"a\"\ntemplate = \"present\"\n[[format]]\nname = \"b\"\ntemplate = \"absent\"\n\
         [[format]]\nname = \"c\"\ntemplate = \"broken\"\n[[format]]\nname = \"d\"\n",
    )]);
    let set = load(d.path()).unwrap();
    let store = TemplateStore::new(tdir.path()).unwrap();
    let problems = set.check_templates(&store);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("10.toml#b") && problems[0].contains("absent"));
    assert!(problems[1].contains("10.toml#c") && problems[1].contains("invalid placeholder"));
}
/// The tables of intelmq-mailgen 1.4.0 example_scripts/10shadowservercsv.py:77-199: (name,
/// [(title, source)]), with spec §11's fix for the swapped `ExtraColumn`
/// arguments of the bare `extra:` names (title and key exchanged back).
const SCRIPT_10_TABLES: &[(&str, &[(&str, &str)])] = &[
    (
        "csv_malware",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("malware", "classification.identifier"),
            ("src_port", "source.port"),
            ("dst_ip", "destination.ip"),
            ("dst_port", "destination.port"),
            ("dst_host", "destination.fqdn"),
            ("proto", "protocol.transport"),
        ],
    ),
    (
        "csv_DNS-open-resolvers",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "csv_Open-Portmapper",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "csv_Open-SNMP",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("sysdesc", "extra.system_desc"),
        ],
    ),
    (
        "csv_Open-LDAP",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("dns_hostname", "source.local_hostname"),
        ],
    ),
    (
        "csv_Open-MSSQL",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.mssql_version"),
            ("server_name", "source.local_hostname"),
            ("instance_name", "extra.instance_name"),
        ],
    ),
    (
        "csv_Open-MongoDB",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.mongodb_version"),
        ],
    ),
    (
        "csv_Open-Chargen",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "csv_Open-IPMI",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "csv_Open-NetBIOS",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("workgroup", "extra.workgroup_name"),
            ("machine_name", "extra.machine_name"),
        ],
    ),
    (
        "csv_NTP-Monitor",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "csv_Open-Elasticsearch",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.elasticsearch_version"),
            ("instance_name", "extra.name"),
        ],
    ),
    (
        "csv_Open-mDNS",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("workstation_info", "extra.workstation_info"),
        ],
    ),
    (
        "csv_Open-Memcached",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.memcached_version"),
        ],
    ),
    (
        "csv_Open-Redis",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.redis_version"),
        ],
    ),
    (
        "csv_Open-SSDP",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("server", "extra.ssdp_server"),
        ],
    ),
    (
        "csv_Ssl-Freak-Scan",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("hostname", "source.reverse_dns"),
            ("subject_common_name", "extra.subject_common_name"),
            ("issuer_common_name", "extra.issuer_common_name"),
            ("freak_cipher_suite", "extra.freak_cipher_suite"),
        ],
    ),
    (
        "csv_Ssl-Scan",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("hostname", "source.reverse_dns"),
            ("subject_common_name", "extra.subject_common_name"),
            ("issuer_common_name", "extra.issuer_common_name"),
        ],
    ),
];

/// The tables of intelmq-mailgen 1.4.0 example_scripts/13vulnerable-service.py:85-192: (name,
/// [(title, source)]), with spec §11's fix for the swapped `ExtraColumn`
/// arguments of the bare `extra:` names (title and key exchanged back).
const SCRIPT_13_TABLES: &[(&str, &[(&str, &str)])] = &[
    (
        "opendns",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "openportmapper",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "opensnmp",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("sysdesc", "extra.system_desc"),
        ],
    ),
    (
        "openldap",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("dns_hostname", "source.local_hostname"),
        ],
    ),
    (
        "openmssql",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.mssql_version"),
            ("server_name", "source.local_hostname"),
            ("instance_name", "extra.instance_name"),
        ],
    ),
    (
        "openmongodb",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.mongodb_version"),
        ],
    ),
    (
        "openchargen",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "openipmi",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "opennetbios",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("workgroup", "extra.workgroup_name"),
            ("machine_name", "extra.machine_name"),
        ],
    ),
    (
        "openntp",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
        ],
    ),
    (
        "openelasticsearch",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.elasticsearch_version"),
            ("instance_name", "extra.name"),
        ],
    ),
    (
        "openmdns",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("workstation_info", "extra.workstation_info"),
        ],
    ),
    (
        "openmemcached",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.memcached_version"),
        ],
    ),
    (
        "openredis",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("version", "extra.redis_version"),
        ],
    ),
    (
        "openssdp",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("server", "extra.ssdp_server"),
        ],
    ),
    (
        "ssl-freak",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("hostname", "source.reverse_dns"),
            ("subject_common_name", "extra.subject_common_name"),
            ("issuer_common_name", "extra.issuer_common_name"),
            ("freak_cipher_suite", "extra.freak_cipher_suite"),
        ],
    ),
    (
        "ssl-poodle",
        &[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("hostname", "source.reverse_dns"),
            ("subject_common_name", "extra.subject_common_name"),
            ("issuer_common_name", "extra.issuer_common_name"),
        ],
    ),
];

// ---------------------------------------------------------------------------
// The shipped files against the example scripts they port, decision by
// decision. Each case names the script line it follows (intelmq-mailgen
// 1.4.0, example_scripts/; the files were renamed 10_..., 11_... after
// 1.4.0 without change, and 20_demo.py was added).

/// What the shipped formats decide for `g` at `now`, in one line.
fn shipped_decision(set: &FormatSet, g: &Group, now: DateTime<Utc>) -> String {
    match set.decide(g, now) {
        Decision::Send(p) => {
            let loc = match p.data_location() {
                Some(DataLocation::Inline) => " inline",
                Some(DataLocation::Attachment) => " attachment",
                None => "",
            };
            format!("send {}{loc}", p.format_name())
        }
        Decision::Postpone { format, .. } => format!("postpone {format}"),
        Decision::Error { format, .. } => format!("error {format}"),
        Decision::NoMatch => "none".into(),
    }
}

/// A group aged as given: newest directive `dir_age` before `now`,
/// `time.observation` `obs_age` before `now` (None: not aggregated by it),
/// last mail `sent_ago` before `now` with a 1-day interval.
fn aged_group(
    nf: &str,
    edf: &str,
    template: &str,
    now: DateTime<Utc>,
    dir_age: Duration,
    obs_age: Option<Duration>,
    sent_ago: Option<Duration>,
) -> Group {
    let obs = obs_age.map(|a| (now - a).format("%Y-%m-%dT%H:%M:%S+00:00").to_string());
    let mut agg = vec![("source.asn", "64496")];
    if let Some(o) = &obs {
        agg.push(("time.observation", o.as_str()));
    }
    group(
        nf,
        edf,
        template,
        &agg,
        now - dir_age,
        Duration::days(1),
        sent_ago.map(|a| now - a),
        &[1],
    )
}

/// The mails of a decided group rendered with a template that shows the
/// location-dependent variables, and the CSV's titles and the column each
/// reads (every field holds its own name, every `extra` key `extra.KEY`).
struct Rendered {
    titles: Vec<String>,
    sources: Vec<String>,
    body: String,
    attached: bool,
}

fn render_shipped(set: &FormatSet, g: &Group, now: DateTime<Utc>) -> Rendered {
    let plan = send(set.decide(g, now));
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(
        tdir.path().join(&g.key.template_name),
        "S ${ticket_number}\n\n[${data_location_en}|${data_inline_separator_en}|\
         ${data_inline_separator_de}|${data_inline_separator_de_en}]\n${events_as_csv}",
    )
    .unwrap();
    let config = config_for(tdir.path(), &shipped_formats(), json!({}));
    let store = TemplateStore::new(tdir.path()).unwrap();
    let mut fields = Vec::new();
    let mut extra = serde_json::Map::new();
    for c in plan.event_columns() {
        if let Some(k) = c.strip_prefix("extra.") {
            extra.insert(k.to_string(), json!(c));
        } else if c == "time.source" {
            fields.push((c, FieldValue::Timestamp(t(2024, 5, 1, 5, 0, 0))));
        } else {
            fields.push((c.clone(), FieldValue::Text(c.clone())));
        }
    }
    let mut ev: Vec<(&str, FieldValue)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let extra = FieldValue::Json(Value::Object(extra));
    ev.push(("extra", extra));
    let events = [event(1, &ev)];
    let mails = plan
        .render(&RenderContext {
            group: g,
            events: &events,
            tickets: &[ticket(10000001)],
            templates: &store,
            config: &config,
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let m = &mails[0];
    let attached = !m.attachments.is_empty();
    let csv = if attached {
        m.attachments[0].content.clone()
    } else {
        m.body[m.body.find("]\n").unwrap() + 2..].to_string()
    };
    let rows: Vec<Vec<String>> = csv
        .split("\r\n")
        .filter(|r| !r.trim().is_empty())
        .map(|r| {
            r.trim_matches('"')
                .split("\",\"")
                .map(str::to_string)
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 2, "{csv}");
    let sources = rows[1]
        .iter()
        .map(|v| match v.as_str() {
            "2024-05-01 05:00:00" => "time.source".to_string(),
            other => other.to_string(),
        })
        .collect();
    Rendered {
        titles: rows[0].clone(),
        sources,
        body: m.body.clone(),
        attached,
    }
}

fn pairs(r: &Rendered) -> Vec<(String, String)> {
    r.titles
        .iter()
        .cloned()
        .zip(r.sources.iter().cloned())
        .collect()
}

fn expect_pairs(cols: &[(&str, &str)]) -> Vec<(String, String)> {
    cols.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

const DEFAULT_COLUMNS: &[(&str, &str)] = &[
    ("asn", "source.asn"),
    ("ip", "source.ip"),
    ("timestamp", "time.source"),
    ("src_port", "source.port"),
    ("dst_ip", "destination.ip"),
    ("dst_port", "destination.port"),
    ("dst_host", "destination.fqdn"),
    ("proto", "protocol.transport"),
];

fn m(n: i64) -> Duration {
    Duration::minutes(n)
}

#[test]
fn shipped_10_shadowserver_follows_10shadowservercsv_py() {
    let set = load(&shipped_formats()).unwrap();
    let now = t(2024, 6, 1, 12, 0, 0);
    let ss = |edf: &str, dir: i64, obs: Option<i64>, sent: Option<i64>| {
        aged_group(
            "shadowserver",
            edf,
            "shadowserver_tpl",
            now,
            m(dir),
            obs.map(m),
            sent.map(m),
        )
    };
    let table = "10shadowserver.toml#csv_Open-Redis";
    for (g, want, why) in [
        // :231 newest directive younger than 15 minutes
        (
            ss("csv_Open-Redis", 14, Some(600), None),
            format!("postpone {table}"),
            ":231",
        ),
        // :232 time.observation younger than 2 hours
        (
            ss("csv_Open-Redis", 15, Some(119), None),
            format!("postpone {table}"),
            ":232",
        ),
        (
            ss("csv_Open-Redis", 15, Some(120), None),
            format!("send {table} inline"),
            ":237",
        ),
        // The script never looks at notification_interval.
        (
            ss("csv_Open-Redis", 60, Some(600), Some(1)),
            format!("send {table} inline"),
            ":229-237",
        ),
        // :230 no table for this data format: the script returns None (:239)
        // and the later scripts decide (here the fallback, never sent).
        (
            ss("csv_Unknown", 0, Some(0), None),
            "send 99fallback.toml#fallback inline".into(),
            ":239",
        ),
        // :231-232 short-circuit: a group without time.observation waits
        // for the directive age (and then, where the script crashed on the
        // missing key, is sent: docs/migration.md).
        (
            ss("csv_Open-Redis", 14, None, None),
            format!("postpone {table}"),
            ":231",
        ),
        (
            ss("csv_Open-Redis", 15, None, None),
            format!("send {table} inline"),
            ":232",
        ),
    ] {
        assert_eq!(
            shipped_decision(&set, &g, now),
            want,
            "10shadowservercsv.py{why}"
        );
    }
    // :77-199 every table, its titles and columns (:23-35 titles; spec §11
    // fixes the swapped ExtraColumn arguments of :54); :235-237 inline, the
    // inline texts.
    for (name, cols) in SCRIPT_10_TABLES {
        let g = ss(name, 60, Some(600), None);
        let r = render_shipped(&set, &g, now);
        assert_eq!(pairs(&r), expect_pairs(cols), "{name}");
        assert!(!r.attached, "{name}");
        assert!(r.body.contains("[below|-----"), "{}", r.body);
    }
    let tables: Vec<String> = set
        .rule_names()
        .into_iter()
        .filter(|n| n.starts_with("10shadowserver.toml#"))
        .collect();
    assert_eq!(tables.len(), SCRIPT_10_TABLES.len(), "{tables:?}");
}

#[test]
fn shipped_11_malware_infection_follows_11malware_infection_py() {
    let set = load(&shipped_formats()).unwrap();
    let now = t(2024, 6, 1, 12, 0, 0);
    let g = |nf: &str, edf: &str, dir: i64, obs: Option<i64>, sent: Option<i64>| {
        aged_group(nf, edf, "tpl", now, m(dir), obs.map(m), sent.map(m))
    };
    let f = "11malware-infection.toml";
    for (grp, want, why) in [
        // :79-81 malware-infection waits for its interval only
        (
            g(
                "malware-infection",
                "malware-infection_csv_inline",
                0,
                Some(0),
                Some(60),
            ),
            format!("postpone {f}#malware-infection-wait"),
            ":80",
        ),
        (
            g(
                "malware-infection",
                "malware-infection_csv_inline",
                0,
                Some(0),
                None,
            ),
            format!("send {f}#malware-infection inline"),
            ":95-99",
        ),
        (
            g(
                "malware-infection",
                "malware-infection_csv_attachment",
                0,
                Some(0),
                Some(1441),
            ),
            format!("send {f}#malware-infection attachment"),
            ":101-109",
        ),
        // :77-87 postponement is decided before the data format (:94-109):
        // no suffix, interval not over: postponed; over: later scripts.
        (
            g("malware-infection", "csv", 0, None, Some(60)),
            format!("postpone {f}#malware-infection-wait"),
            ":80",
        ),
        (
            g("malware-infection", "csv", 0, None, None),
            "send 99fallback.toml#fallback inline".into(),
            ":94-109 None",
        ),
        // :83-87 the special matters wait for both ages, not the interval
        (
            g("avalanche", "avalanche_csv_inline", 14, Some(600), None),
            format!("postpone {f}#special-matters-wait"),
            ":85",
        ),
        (
            g("ebury", "ebury_csv_inline", 60, Some(119), None),
            format!("postpone {f}#special-matters-wait"),
            ":86",
        ),
        (
            g(
                "mumblehard",
                "mumblehard_csv_attachment",
                15,
                Some(120),
                Some(1),
            ),
            format!("send {f}#special-matters attachment"),
            ":85-91",
        ),
        (
            g("avalanche", "avalanche_csv_inline", 15, Some(120), None),
            format!("send {f}#avalanche inline"),
            ":85-91",
        ),
        (
            g("ebury", "ebury", 14, Some(600), None),
            format!("postpone {f}#special-matters-wait"),
            ":85",
        ),
        (
            g("ebury", "ebury", 15, Some(600), None),
            "send 99fallback.toml#fallback inline".into(),
            ":94-109 None",
        ),
        // :74-75 other matters are not this script's.
        (
            g("botnet", "botnet_csv_inline", 0, None, None),
            "send 99fallback.toml#fallback inline".into(),
            ":75",
        ),
    ] {
        assert_eq!(
            shipped_decision(&set, &grp, now),
            want,
            "11malware-infection.py{why}"
        );
    }
    let special = |fqdn: (&str, &str)| {
        let mut v = expect_pairs(&[
            ("ASN", "source.asn"),
            ("IP", "source.ip"),
            ("Time", "time.source"),
            ("Identifier", "classification.identifier"),
            ("Malware", "malware.name"),
            ("Port", "source.port"),
            ("Destination-IP", "destination.ip"),
            ("Destination-Port", "destination.port"),
        ]);
        v.push((fqdn.0.into(), fqdn.1.into()));
        v
    };
    // :39-48 avalanche reads Destination-FQDN from extra.http_host_header
    let r = render_shipped(
        &set,
        &g("avalanche", "a_csv_inline", 60, Some(600), None),
        now,
    );
    assert_eq!(
        pairs(&r),
        special(("Destination-FQDN", "extra.http_host_header"))
    );
    // :50-59 ebury and mumblehard from destination.fqdn
    for nf in ["ebury", "mumblehard"] {
        let r = render_shipped(&set, &g(nf, "a_csv_inline", 60, Some(600), None), now);
        assert_eq!(
            pairs(&r),
            special(("Destination-FQDN", "destination.fqdn")),
            "{nf}"
        );
    }
    // :63-72 malware-infection
    let r = render_shipped(
        &set,
        &g("malware-infection", "x_csv_inline", 0, None, None),
        now,
    );
    assert_eq!(
        pairs(&r),
        expect_pairs(&[
            ("asn", "source.asn"),
            ("ip", "source.ip"),
            ("timestamp", "time.source"),
            ("malware", "classification.identifier"),
            ("src_port", "source.port"),
            ("dst_ip", "destination.ip"),
            ("dst_port", "destination.port"),
            ("dst_host", "destination.fqdn"),
            ("proto", "protocol.transport"),
        ])
    );
    // :97-98 inline texts; :104-107 attachment texts, separators _en and
    // _de blanked, _de_en kept.
    assert!(r.body.contains("[below|-----"), "{}", r.body);
    assert!(!r.attached);
    let r = render_shipped(
        &set,
        &g("malware-infection", "x_csv_attachment", 0, None, None),
        now,
    );
    assert!(r.attached);
    assert!(
        r.body.contains("[in the attached file events.csv|||-----"),
        "{}",
        r.body
    );
}

#[test]
fn shipped_13_vulnerable_service_follows_13vulnerable_service_py() {
    let set = load(&shipped_formats()).unwrap();
    let now = t(2024, 6, 1, 12, 0, 0);
    let g = |edf: &str, tpl: &str, dir: i64, obs: Option<i64>, sent: Option<i64>| {
        aged_group(
            "vulnerable-service",
            edf,
            tpl,
            now,
            m(dir),
            obs.map(m),
            sent.map(m),
        )
    };
    let f = "13vulnerable-service.toml";
    for (grp, want, why) in [
        // :199-201 both ages, before anything else
        (
            g("x_csv_inline", "openredis_provider", 14, Some(600), None),
            format!("postpone {f}#wait"),
            ":199",
        ),
        (
            g("x_csv_inline", "openredis_provider", 15, Some(119), None),
            format!("postpone {f}#wait"),
            ":200",
        ),
        (
            g("x_csv", "openredis_provider", 14, Some(600), None),
            format!("postpone {f}#wait"),
            ":199 (before :228-242)",
        ),
        // :219-223 table by the template name's first "_" part
        (
            g("x_csv_inline", "openredis_provider", 15, Some(120), Some(1)),
            format!("send {f}#openredis inline"),
            ":219-233",
        ),
        (
            g("x_csv_attachment", "openredis", 15, Some(120), None),
            format!("send {f}#openredis attachment"),
            ":235-242",
        ),
        (
            g("x_csv_inline", "unknown_provider", 15, None, None),
            format!("send {f}#vulnerable-service-default inline"),
            ":221 None",
        ),
        // :228-242 neither suffix: None, later scripts decide.
        (
            g("x_csv", "openredis_provider", 15, Some(120), None),
            "send 99fallback.toml#fallback inline".into(),
            ":228-242 None",
        ),
    ] {
        assert_eq!(
            shipped_decision(&set, &grp, now),
            want,
            "13vulnerable-service.py{why}"
        );
    }
    // :85-192 every table with its titles (:16-44) and columns (spec §11
    // fix of the swapped ExtraColumn arguments of :62); an unknown table
    // the default column set (notification.py's FALLBACK_FORMAT_SPEC).
    for (name, cols) in SCRIPT_13_TABLES {
        for tpl in [name.to_string(), format!("{name}_provider")] {
            let r = render_shipped(&set, &g("x_csv_inline", &tpl, 60, Some(600), None), now);
            assert_eq!(pairs(&r), expect_pairs(cols), "{tpl}");
        }
    }
    let r = render_shipped(&set, &g("x_csv_attachment", "openx_y", 60, None, None), now);
    assert_eq!(pairs(&r), expect_pairs(DEFAULT_COLUMNS));
    // :237-240 the attachment texts, _en/_de separators blanked.
    assert!(r.attached);
    assert!(
        r.body.contains("[in the attached file events.csv|||-----"),
        "{}",
        r.body
    );
}

#[test]
fn shipped_20_demo_follows_20_demo_py() {
    let set = load(&shipped_formats()).unwrap();
    let now = t(2024, 6, 1, 12, 0, 0);
    // 20_demo.py:12-14 only notification_format "demo"; :16-17 never waits,
    // default columns, attached, the context's variables unchanged (the
    // inline separators keep their text).
    let g = aged_group(
        "demo",
        "anything",
        "demo",
        now,
        m(0),
        Some(m(0)),
        Some(m(1)),
    );
    assert_eq!(
        shipped_decision(&set, &g, now),
        "send 20demo.toml#demo attachment"
    );
    let r = render_shipped(&set, &g, now);
    assert!(r.attached);
    assert_eq!(pairs(&r), expect_pairs(DEFAULT_COLUMNS));
    assert!(r.body.contains("|-----"), "{}", r.body);
    assert!(!r.body.contains("|||"), "{}", r.body);
}

#[test]
fn shipped_21_xarf_follows_20xarf_py() {
    let set = load(&shipped_formats()).unwrap();
    let now = t(2024, 6, 1, 12, 0, 0);
    let g = |edf: &str, sent: Option<i64>| {
        aged_group(
            "xarf",
            edf,
            "xarf-description-template",
            now,
            m(0),
            Some(m(0)),
            sent.map(m),
        )
    };
    let f = "21xarf.toml";
    for (grp, want, why) in [
        // :207-208 the interval first
        (
            g("bot-infection_0.2.0_unstable", Some(60)),
            format!("postpone {f}#wait"),
            ":207",
        ),
        (
            g("other_schema", Some(60)),
            format!("postpone {f}#wait"),
            ":207 (before :212)",
        ),
        // :210-214 event_data_format names the schema (docstring :7-10)
        (
            g("bot-infection_0.2.0_unstable", None),
            format!("send {f}#bot-infection_0.2.0_unstable"),
            ":212-214",
        ),
        // :215-217 unknown schema: the script raised (and the old tool
        // then sent the fallback); an error here (spec §11).
        (
            g("other_schema", Some(1441)),
            format!("error {f}#unknown-schema"),
            ":217",
        ),
    ] {
        assert_eq!(shipped_decision(&set, &grp, now), want, "20xarf.py{why}");
    }
    let mut other = g("bot-infection_0.2.0_unstable", None);
    other.key.notification_format = "bot-infection".into();
    assert_eq!(
        shipped_decision(&set, &other, now),
        "send 99fallback.toml#fallback inline",
        "20xarf.py:204-205"
    );
}

#[test]
fn shipped_99_fallback_follows_99fallback_py() {
    let set = load(&shipped_formats()).unwrap();
    let now = t(2024, 6, 1, 12, 0, 0);
    let g = |sent: Option<i64>| {
        aged_group("other", "other", "none", now, m(0), Some(m(0)), sent.map(m))
    };
    // 99fallback.py:38-39 the interval (1 day here)
    assert_eq!(
        shipped_decision(&set, &g(Some(1440)), now),
        "postpone 99fallback.toml#fallback"
    );
    assert_eq!(
        shipped_decision(&set, &g(Some(1441)), now),
        "send 99fallback.toml#fallback inline"
    );
    // :13-23 the default columns; :27-34 the inline template.
    let config = config_for(&shipped_templates(), &shipped_formats(), json!({}));
    let store = TemplateStore::new(&shipped_templates()).unwrap();
    let grp = g(None);
    let plan = send(set.decide(&grp, now));
    let mails = plan
        .render(&RenderContext {
            group: &grp,
            events: &[event(1, &[("source.asn", FieldValue::Int(64496))])],
            tickets: &[ticket(10000001)],
            templates: &store,
            config: &config,
        })
        .unwrap();
    assert_eq!(mails[0].subject, "CB-Report#20240501-10000001");
    assert_eq!(
        mails[0].body,
        "Dear Sir or Madam,\n\nPlease find below a list of affected systems on your network(s).\n\n\
         Events:\n\"asn\",\"ip\",\"timestamp\",\"src_port\",\"dst_ip\",\"dst_port\",\"dst_host\",\"proto\"\r\n\
         \"64496\",\"\",\"\",\"\",\"\",\"\",\"\",\"\"\r\n"
    );
}

#[test]
fn a_continue_rule_waits_or_passes_and_takes_no_mail_keys() {
    let d = format_dir(&[(
        "10.toml",
        r#"
[[format]]
name = "wait"
continue = true
match.notification_format = "a"
postpone.min_directive_age = "10m"

[[format]]
name = "send"
match.notification_format = "a"
match.event_data_format = "x"
"#,
    )]);
    let set = load(d.path()).unwrap();
    let now = t(2024, 6, 1, 12, 0, 0);
    let g = |edf: &str, age: i64| aged_group("a", edf, "t", now, m(age), None, None);
    assert_eq!(
        shipped_decision(&set, &g("x", 9), now),
        "postpone 10.toml#wait"
    );
    assert_eq!(
        shipped_decision(&set, &g("y", 9), now),
        "postpone 10.toml#wait"
    );
    assert_eq!(
        shipped_decision(&set, &g("x", 10), now),
        "send 10.toml#send inline"
    );
    assert_eq!(shipped_decision(&set, &g("y", 10), now), "none");
    match set.decide(&g("x", 9), now) {
        Decision::Postpone { until, .. } => assert_eq!(until, Some(now + m(1))),
        other => panic!("{other:?}"),
    }

    let bad = format_dir(&[(
        "10.toml",
        "[[format]]\nname = \"w\"\ncontinue = true\ncolumns = [\"source.ip\"]\n\n\
         [[format]]\nname = \"v\"\ncontinue = true\n",
    )]);
    let err = load(bad.path()).unwrap_err().to_string();
    assert!(
        err.contains("format[0].columns") && err.contains("only waits"),
        "{err}"
    );
    assert!(err.contains("give it a `postpone`"), "{err}");
}

#[test]
fn oversize_takes_compress_split_or_error_and_table_rules_only() {
    // Issue 19: what a mail over the relay's size limit becomes.
    let good = format_dir(&[(
        "10big.toml",
        "[defaults]\noversize = \"split\"\n\n[[format]]\nname = \"a\"\noversize = \"error\"\n\n\
         [[format]]\nname = \"b\"\n",
    )]);
    load(good.path()).unwrap_or_else(|e| panic!("{e}"));
    let bad = format_dir(&[(
        "10big.toml",
        "[[format]]\nname = \"a\"\noversize = \"zip\"\n\n\
         [[format]]\nname = \"b\"\nreject = \"no\"\noversize = \"split\"\n",
    )]);
    let err = load(bad.path()).unwrap_err();
    let reasons: Vec<String> = err
        .0
        .iter()
        .map(|p| format!("{}: {}", p.key, p.reason))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("format[0].oversize: unknown oversize choice \"zip\"")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("format[1].oversize: only table rules")),
        "{reasons:?}"
    );
}
