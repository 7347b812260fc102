//! Reading aitherd.toml again (SIGHUP, `aitherctl daemon reload`; docs/daemon.md
//! "Configuration file"): what can change live is applied at once, what cannot is reported
//! and keeps its running value until the next start, and a bad file (or a metrics address
//! that cannot be bound) changes nothing. Every reload is in the daemon's log, the audit
//! stream (`daemon_reload`) and the event stream (`config_reloaded`).

use serde_json::json;

use super::config::{self, Loaded, ReloadReport};
use super::Shared;
use crate::audit::{Entry, Verdict};

/// Who asked for a reload.
#[derive(Clone, Debug)]
pub enum Trigger {
    /// SIGHUP to aitherd (`systemctl reload aitherd`).
    Signal,
    /// `aitherctl daemon reload` by this uid (`actor` as the audit stream names callers).
    Control { uid: u32, actor: String },
}

/// Reads the file again and applies it; the report says what changed, what needs a restart
/// and why nothing was applied, if so.
pub fn reload(d: &Shared, trigger: &Trigger) -> ReloadReport {
    let _one = d
        .settings
        .reloading
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let running = d.config();
    let spec = &d.settings.spec;
    let mut report = ReloadReport {
        path: spec.path.clone(),
        ..ReloadReport::default()
    };
    match spec.load() {
        Ok(loaded) => match apply(d, &running, loaded, &mut report) {
            Ok(()) => {}
            Err(e) => report.errors.push(e.to_string()),
        },
        Err(e) => report.errors.push(e.to_string()),
    }
    if !report.errors.is_empty() {
        // Nothing applied: what the report listed as changes is what would have changed.
        report.changed.clear();
        report.restart_required.clear();
    }
    record(d, trigger, &report);
    report
}

/// Puts `loaded` in force over `running`, but for the fields that need a restart.
fn apply(
    d: &Shared,
    running: &Loaded,
    loaded: Loaded,
    report: &mut ReloadReport,
) -> Result<(), super::metrics::BindError> {
    let changes = config::diff(&running.config, &loaded.config);
    let (live, restart): (Vec<_>, Vec<_>) =
        changes.into_iter().partition(|c| config::is_live(&c.field));
    let new = config::keep_restart_fields(&running.config, loaded.config);
    // The one step that can fail comes first: on an error the old listener stays and nothing
    // else has changed.
    if let Some(listen) = &new.metrics.listen {
        if new.metrics.listen != running.config.metrics.listen {
            d.metrics.switch(d, listen)?;
        }
    }
    let r = &new.retention;
    crate::audit::set_rotation(r.audit_rotate_bytes.0, r.audit_keep);
    d.bus.log.set_retention(crate::bus::log::Retention::of(
        r.bus_max_bytes.0,
        r.bus_max_age.0,
    ));
    // Limits, per-user limits, the agent-log rotation and the GPU poll interval are read
    // where they are used, from the configuration in force.
    let mut sources = loaded.sources;
    sources.retain(|k, _| config::is_live(k));
    for (k, v) in &running.sources {
        if !config::is_live(k) {
            sources.insert(k.clone(), *v);
        }
    }
    d.settings.set(Loaded {
        config: new,
        sources,
        file_present: loaded.file_present,
    });
    report.changed = live;
    report.restart_required = restart;
    Ok(())
}

/// The daemon's log, the audit stream and the event stream hear of the reload.
fn record(d: &Shared, trigger: &Trigger, report: &ReloadReport) {
    let data = serde_json::to_value(report).unwrap_or_default();
    let by = match trigger {
        Trigger::Signal => "SIGHUP".to_string(),
        Trigger::Control { actor, .. } => actor.clone(),
    };
    let rule = if report.errors.is_empty() {
        tracing::info!(
            by,
            changed = ?report.changed.iter().map(|c| &c.field).collect::<Vec<_>>(),
            restart_required = ?report.restart_required.iter().map(|c| &c.field).collect::<Vec<_>>(),
            "configuration reloaded from {}",
            report.path.display()
        );
        format!(
            "aitherd.toml reloaded: {} changed, {} need a restart",
            report.changed.len(),
            report.restart_required.len()
        )
    } else {
        tracing::error!(by, errors = ?report.errors, "configuration not reloaded; the running one is kept");
        "aitherd.toml not reloaded: the running configuration is kept".to_string()
    };
    let mut e = Entry::new("daemon_reload", Verdict::Info, rule)
        .agent("aitherd")
        .actor(by)
        .data(data.clone());
    if let Trigger::Control { uid, .. } = trigger {
        e = e.caller(*uid);
    }
    d.audit.record(e);
    d.emit_daemon("config_reloaded", json!({"report": data}));
}
