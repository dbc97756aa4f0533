//! What the user sees while hosts converge: one indicatif progress bar per host on a terminal (task k/n
//! and its name), plain lines otherwise, nothing with `--json`; then the recap table.
//!
//! Diffs, notes and errors are printed above the bars (through `MultiProgress::println`) so they never
//! tear a bar apart.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::run::{HostRecap, Recap};

/// How a task ended on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Ok,
    Changed,
    Skipped,
    Failed,
    /// Failed, with `ignore_errors: true`.
    Ignored,
}

impl TaskStatus {
    pub fn label(self) -> &'static str {
        match self {
            TaskStatus::Ok => "ok",
            TaskStatus::Changed => "changed",
            TaskStatus::Skipped => "skipped",
            TaskStatus::Failed => "FAILED",
            TaskStatus::Ignored => "failed (ignored)",
        }
    }
}

/// A finished task, as reported.
#[derive(Debug)]
pub struct TaskEvent<'a> {
    pub index: usize,
    pub name: &'a str,
    pub status: TaskStatus,
    pub diff: Option<&'a str>,
    pub notes: &'a [String],
    pub error: Option<&'a str>,
    /// How long the task took on this host.
    pub elapsed: std::time::Duration,
}

/// Receives the runner's progress; implementations must be cheap (they are called for every task).
pub trait Reporter: Send + Sync {
    fn host_connecting(&self, host: &str);
    fn host_started(&self, host: &str, total_tasks: usize);
    /// Handlers were notified: the host has `more` tasks to run.
    fn add_tasks(&self, host: &str, more: usize);
    fn task_started(&self, host: &str, index: usize, name: &str);
    fn task_finished(&self, host: &str, event: &TaskEvent<'_>);
    fn note(&self, host: &str, note: &str);
    fn host_finished(&self, host: &str, recap: &HostRecap);
}

/// Which reporter suits the output.
pub fn for_output(json: bool, show_diff: bool) -> Box<dyn Reporter> {
    use std::io::IsTerminal;
    if json {
        Box::new(Silent)
    } else if std::io::stdout().is_terminal() {
        Box::new(Bars::new(show_diff))
    } else {
        Box::new(Lines { show_diff })
    }
}

/// `--json`: nothing until the recap.
pub struct Silent;

impl Reporter for Silent {
    fn host_connecting(&self, _: &str) {}
    fn host_started(&self, _: &str, _: usize) {}
    fn add_tasks(&self, _: &str, _: usize) {}
    fn task_started(&self, _: &str, _: usize, _: &str) {}
    fn task_finished(&self, _: &str, _: &TaskEvent<'_>) {}
    fn note(&self, _: &str, _: &str) {}
    fn host_finished(&self, _: &str, _: &HostRecap) {}
}

/// Plain lines, for logs and pipes: `host | status | task`.
pub struct Lines {
    pub show_diff: bool,
}

impl Lines {
    fn print(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

impl Reporter for Lines {
    fn host_connecting(&self, host: &str) {
        self.print(&format!("{host} | connecting\n"));
    }

    fn host_started(&self, host: &str, total: usize) {
        self.print(&format!("{host} | {total} tasks\n"));
    }

    fn add_tasks(&self, _: &str, _: usize) {}

    fn task_started(&self, _: &str, _: usize, _: &str) {}

    fn task_finished(&self, host: &str, e: &TaskEvent<'_>) {
        self.print(&event_text(host, e, self.show_diff, true));
    }

    fn note(&self, host: &str, note: &str) {
        self.print(&format!("{host} | note | {note}\n"));
    }

    fn host_finished(&self, host: &str, r: &HostRecap) {
        let mut text = format!("{host} | done | {}\n", counts(r));
        if r.unreachable {
            let _ = writeln!(
                text,
                "{host} | UNREACHABLE | {}",
                r.error.as_deref().unwrap_or("")
            );
        }
        self.print(&text);
    }
}

/// One progress bar per host.
pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    show_diff: bool,
}

impl Bars {
    pub fn new(show_diff: bool) -> Self {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            bars: Mutex::new(HashMap::new()),
            show_diff,
        }
    }

    fn bar(&self, host: &str) -> ProgressBar {
        let mut bars = self.bars.lock().expect("reporter lock");
        bars.entry(host.to_string())
            .or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>14.bold} [{bar:24.cyan/blue}] {pos:>3}/{len:3} {wide_msg}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(host.to_string());
                bar.enable_steady_tick(std::time::Duration::from_millis(200));
                bar
            })
            .clone()
    }

    fn println(&self, text: &str) {
        let _ = self.multi.println(text.trim_end_matches('\n'));
    }
}

impl Reporter for Bars {
    fn host_connecting(&self, host: &str) {
        self.bar(host).set_message("connecting");
    }

    fn host_started(&self, host: &str, total: usize) {
        self.bar(host).set_length(total as u64);
    }

    fn add_tasks(&self, host: &str, more: usize) {
        self.bar(host).inc_length(more as u64);
    }

    fn task_started(&self, host: &str, _index: usize, name: &str) {
        self.bar(host).set_message(name.to_string());
    }

    fn task_finished(&self, host: &str, e: &TaskEvent<'_>) {
        let bar = self.bar(host);
        bar.inc(1);
        // Only what deserves attention goes above the bars: changes, notes, failures.
        if e.status != TaskStatus::Ok && e.status != TaskStatus::Skipped || !e.notes.is_empty() {
            self.println(&event_text(host, e, self.show_diff, false));
        }
    }

    fn note(&self, host: &str, note: &str) {
        self.println(&format!("{host} | note | {note}"));
    }

    fn host_finished(&self, host: &str, r: &HostRecap) {
        let bar = self.bar(host);
        if r.unreachable {
            bar.abandon_with_message(format!("UNREACHABLE: {}", r.error.as_deref().unwrap_or("")));
        } else if r.success() {
            bar.finish_with_message(counts(r));
        } else {
            bar.abandon_with_message(format!("FAILED · {}", counts(r)));
        }
    }
}

fn event_text(host: &str, e: &TaskEvent<'_>, show_diff: bool, always: bool) -> String {
    let mut text = String::new();
    if always || e.status != TaskStatus::Ok {
        let _ = writeln!(
            text,
            "{host} | {} | {} ({:.1} s)",
            e.status.label(),
            e.name,
            e.elapsed.as_secs_f64()
        );
    }
    if show_diff {
        if let Some(diff) = e.diff {
            for line in diff.lines() {
                let _ = writeln!(text, "{host} |   {line}");
            }
        }
    }
    for note in e.notes {
        let _ = writeln!(text, "{host} | note | {note}");
    }
    if let Some(err) = e.error {
        let _ = writeln!(text, "{host} | error | {err}");
    }
    text
}

fn counts(r: &HostRecap) -> String {
    format!(
        "ok={} changed={} skipped={} failed={}",
        r.ok, r.changed, r.skipped, r.failed
    )
}

/// The recap table, like Ansible's PLAY RECAP, then the error of each host that has one.
pub fn recap_table(recap: &Recap) -> String {
    let width = recap
        .hosts
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = String::from("\nRECAP\n");
    for (name, r) in &recap.hosts {
        let _ = writeln!(
            out,
            "{name:<width$}  ok={:<4} changed={:<4} skipped={:<4} failed={:<4} unreachable={}",
            r.ok,
            r.changed,
            r.skipped,
            r.failed,
            u8::from(r.unreachable)
        );
    }
    for (name, r) in &recap.hosts {
        if let Some(e) = &r.error {
            let _ = writeln!(out, "{name}: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recap_table_lists_every_host_and_errors() {
        let recap = Recap {
            hosts: vec![
                (
                    "web1".into(),
                    HostRecap {
                        ok: 3,
                        changed: 1,
                        ..HostRecap::default()
                    },
                ),
                (
                    "db1".into(),
                    HostRecap {
                        unreachable: true,
                        error: Some("connection refused".into()),
                        ..HostRecap::default()
                    },
                ),
            ],
        };
        let t = recap_table(&recap);
        assert!(t.contains("web1  ok=3    changed=1"), "{t}");
        assert!(t.contains("unreachable=1"), "{t}");
        assert!(t.contains("db1: connection refused"), "{t}");
        assert!(!recap.success());
        assert_eq!(recap.to_json()["hosts"]["web1"]["changed"], 1);
        assert_eq!(recap.to_json()["ok"], false);
    }
}
