//! `mailgend check-config`: loads the configuration, the format files,
//! the templates, the signing key and the SMTP settings the way `run`
//! would, and prints every problem at once (exit 1 when there is any).

use std::process::ExitCode;

use crate::config::{Config, ConfigSource};

/// Reports every problem at once; exit 1 when there is any.
pub fn run(source: &ConfigSource) -> ExitCode {
    let mut problems: Vec<String> = Vec::new();
    let config = match Config::load(source) {
        Ok(c) => c,
        Err(e) => {
            for p in e.0 {
                println!("ERROR {p}");
            }
            return ExitCode::from(1);
        }
    };
    for p in &config.unknown_keys {
        println!("WARNING {p}");
    }
    // Not problems for mailgend: what would keep a rollback to
    // intelmqcbmail from working with these files (docs/config.md).
    for p in &config.rollback_problems {
        println!("WARNING {p}");
    }
    match crate::notify::format::FormatSet::load(&config.script_directory, &config) {
        Ok(formats) => {
            if !formats.python_scripts().is_empty() {
                println!(
                    "WARNING Python format scripts are ignored: {}",
                    formats
                        .python_scripts()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            match crate::notify::render::template::TemplateStore::new(&config.template_dir) {
                Ok(store) => problems.extend(formats.check_templates(&store)),
                Err(e) => problems.push(format!("template_dir: {e}")),
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    if config.openpgp.always_sign {
        if let Err(e) = crate::notify::pipeline::load_signer(&config) {
            problems.push(format!("openpgp: {e}"));
        }
    }
    if let Err(e) = crate::shared::smtp::Outbound::new(&config.smtp, 1) {
        problems.push(format!("smtp: {e}"));
    }
    if problems.is_empty() {
        println!(
            "configuration OK ({})",
            config
                .files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + ")
        );
        ExitCode::SUCCESS
    } else {
        for p in problems {
            println!("ERROR {p}");
        }
        ExitCode::from(1)
    }
}
