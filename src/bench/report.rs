//! The bench's result: one structure, printed as tables or as JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::client::{Cleanup, Failure};
use super::procfs::ProcMemory;
use super::stats::{
    Summary, duration_ratio, format_duration, format_kib, format_ratio, megabytes_per_second, ratio,
};
use super::table::Table;
use super::target::{MemoryReport, Snapshot, Target};
use super::{Ctx, Scenario};

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub run_id: String,
    /// Seconds since the epoch when the run started.
    pub started_unix: u64,
    pub iterations: u32,
    pub warmup: u32,
    pub image: String,
    pub pods: Option<u32>,
    /// Density: whether the containers were chatty (`--chatty`).
    pub chatty: Option<bool>,
    pub clients: Option<u32>,
    pub interrupted: bool,
    pub endpoints: Vec<EndpointReport>,
    /// Endpoint / compare, per operation (with --compare).
    pub comparison: Vec<Comparison>,
}

#[derive(Debug, Serialize)]
pub struct EndpointReport {
    pub url: String,
    pub runtime_name: String,
    pub runtime_version: String,
    pub daemon_pid: Option<i32>,
    pub daemon_found_by: &'static str,
    pub operations: Vec<OpStats>,
    pub memory: MemoryReport,
    pub pull: Option<PullStats>,
    /// The RPC that stopped this endpoint's part, if one did.
    pub failure: Option<Failure>,
    /// RPCs answered Unimplemented that the scenario went on without.
    pub skipped: Vec<Failure>,
    pub cleanup: Cleanup,
    pub notes: Vec<String>,
    #[serde(skip)]
    name: String,
}

#[derive(Debug, Serialize)]
pub struct OpStats {
    pub op: String,
    pub n: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    #[serde(skip)]
    summary: Summary,
}

#[derive(Debug, Serialize)]
pub struct PullStats {
    /// The image's size as this endpoint reports it (manifest, config and
    /// compressed layers).
    pub size_bytes: u64,
    /// size / median PullImage time.
    pub median_mb_per_s: Option<f64>,
    /// size / fastest PullImage time.
    pub best_mb_per_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Comparison {
    pub op: String,
    pub median_ratio: Option<f64>,
    pub p99_ratio: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Report {
    pub fn new(
        ctx: &Ctx,
        scenario: Scenario,
        started_unix: u64,
        interrupted: bool,
        targets: Vec<Target>,
        cleanups: Vec<Cleanup>,
    ) -> Report {
        let endpoints: Vec<EndpointReport> = targets
            .into_iter()
            .zip(cleanups)
            .map(|(t, cleanup)| endpoint_report(t, cleanup))
            .collect();
        let comparison = match endpoints.as_slice() {
            [a, b] => compare(a, b),
            _ => Vec::new(),
        };
        Report {
            scenario,
            run_id: ctx.naming.run_id.clone(),
            started_unix,
            iterations: ctx.iterations,
            warmup: ctx.warmup,
            image: ctx.image.clone(),
            pods: (scenario == Scenario::Density).then_some(ctx.pods),
            chatty: (scenario == Scenario::Density).then_some(ctx.chatty),
            clients: (scenario == Scenario::Churn).then_some(ctx.clients),
            interrupted,
            endpoints,
            comparison,
        }
    }

    /// Every failure is an RPC the runtime does not implement yet, and the
    /// clean-up left nothing behind.
    pub fn clean(&self) -> bool {
        !self.interrupted
            && self.endpoints.iter().all(|e| {
                e.failure.as_ref().is_none_or(Failure::is_unimplemented)
                    && e.cleanup.errors.is_empty()
            })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let warm = if self.warmup > 0 && self.scenario.makes_pods() {
            format!(" (+{} warm-up)", self.warmup)
        } else {
            String::new()
        };
        let image = if self.image.is_empty() {
            String::new()
        } else {
            format!(", image {}", self.image)
        };
        let _ = write!(
            out,
            "berth bench: scenario {}, {} iteration(s){warm}{image}, run {}",
            self.scenario.name(),
            self.iterations,
            self.run_id
        );
        if let Some(p) = self.pods {
            let _ = write!(out, ", {p} pods");
        }
        if self.chatty == Some(true) {
            out.push_str(" with chatty containers");
        }
        if let Some(c) = self.clients {
            let _ = write!(out, ", {c} clients");
        }
        out.push('\n');
        let mut who = Table::text(["endpoint", "version", "url", "daemon"]);
        for e in &self.endpoints {
            let daemon = match e.daemon_pid {
                Some(pid) => format!("pid {pid} ({})", e.daemon_found_by),
                None => "not found (pass --daemon-pid/--compare-pid)".to_string(),
            };
            who.row([
                e.name.clone(),
                e.runtime_version.clone(),
                e.url.clone(),
                daemon,
            ]);
        }
        out.push_str(&who.render());
        out.push('\n');
        out.push_str(&self.ops_table());
        out.push('\n');
        out.push_str(&self.memory_table());
        if self.scenario == Scenario::Pull {
            out.push('\n');
            out.push_str(&self.pull_table());
        }
        let mut tail = String::new();
        for e in &self.endpoints {
            for f in &e.skipped {
                let _ = writeln!(tail, "{}: not measurable yet, skipped: {f}", e.name);
            }
            if let Some(f) = &e.failure {
                let what = if f.is_unimplemented() {
                    "not measurable yet"
                } else {
                    "FAILED"
                };
                let _ = writeln!(tail, "{}: {what}: {f}", e.name);
            }
            for note in &e.notes {
                let _ = writeln!(tail, "{}: note: {note}", e.name);
            }
            let c = &e.cleanup;
            let mut made = Vec::new();
            if c.pods > 0 {
                made.push(format!("{} pod(s)", c.pods));
            }
            if c.containers > 0 {
                made.push(format!("{} container(s)", c.containers));
            }
            if c.image_removed {
                made.push("the image it pulled".to_string());
            }
            let removed = if made.is_empty() {
                "nothing was left".to_string()
            } else {
                format!("removed {}", made.join(", "))
            };
            let _ = writeln!(tail, "{}: clean-up: {removed}", e.name);
            for err in &c.errors {
                let _ = writeln!(tail, "{}: clean-up FAILED: {err}", e.name);
            }
        }
        if self.interrupted {
            tail.push_str("interrupted: the numbers above are partial\n");
        }
        if !tail.is_empty() {
            out.push('\n');
            out.push_str(&tail);
        }
        out
    }

    fn ops_table(&self) -> String {
        let mut headers = vec!["operation".to_string()];
        for e in &self.endpoints {
            headers.extend([
                format!("{} n", e.name),
                format!("{} p50", e.name),
                format!("{} p99", e.name),
            ]);
        }
        if let [a, b] = self.endpoints.as_slice() {
            headers.extend([
                format!("p50 {}/{}", a.name, b.name),
                format!("p99 {}/{}", a.name, b.name),
            ]);
        }
        let mut table = Table::new(headers);
        for op in op_names(&self.endpoints) {
            let mut row = vec![op.clone()];
            for e in &self.endpoints {
                match e.operations.iter().find(|o| o.op == op) {
                    Some(o) => row.extend([
                        o.n.to_string(),
                        format_duration(o.summary.median),
                        format_duration(o.summary.p99),
                    ]),
                    None => row.extend(["0".to_string(), "-".to_string(), "-".to_string()]),
                }
            }
            if let Some(c) = self.comparison.iter().find(|c| c.op == op) {
                row.extend([format_ratio(c.median_ratio), format_ratio(c.p99_ratio)]);
            }
            table.row(row);
        }
        if table.is_empty() {
            return "no operation completed\n".to_string();
        }
        table.render()
    }

    fn memory_table(&self) -> String {
        let mut headers = vec!["memory".to_string()];
        headers.extend(self.endpoints.iter().map(|e| e.name.clone()));
        if let [a, b] = self.endpoints.as_slice() {
            headers.push(format!("{}/{}", a.name, b.name));
        }
        let mut table = Table::new(headers);
        // Memory with pods is only comparable where both endpoints' pods
        // hold a container.
        let comparable = self.endpoints.iter().all(EndpointReport::with_containers);
        let row = |label: String, values: Vec<Option<f64>>, table: &mut Table, compare: bool| {
            if values.iter().all(Option::is_none) {
                return;
            }
            let mut cells = vec![label];
            cells.extend(values.iter().map(|v| v.map_or("-".to_string(), format_kib)));
            if let ([Some(a), Some(b)], true) = (values.as_slice(), compare) {
                cells.push(format_ratio(ratio(*a, *b)));
            } else if values.len() == 2 {
                cells.push("-".to_string());
            }
            table.row(cells);
        };
        let each = |f: &dyn Fn(&MemoryReport) -> Option<f64>| -> Vec<Option<f64>> {
            self.endpoints.iter().map(|e| f(&e.memory)).collect()
        };
        let rss = |p: Option<ProcMemory>| p.map(|p| p.rss_kib as f64);
        let pss = |p: Option<ProcMemory>| p.and_then(|p| p.pss_kib).map(|v| v as f64);
        row(
            "daemon RSS at start".into(),
            each(&|m| rss(m.start.daemon)),
            &mut table,
            true,
        );
        row(
            "daemon PSS at start".into(),
            each(&|m| pss(m.start.daemon)),
            &mut table,
            true,
        );
        row(
            "daemon RSS peak".into(),
            each(&|m| m.daemon_peak_rss_kib.map(|v| v as f64)),
            &mut table,
            true,
        );
        row(
            "daemon RSS at end".into(),
            each(&|m| rss(m.end.daemon)),
            &mut table,
            true,
        );
        let helper = |label: &str| {
            let names: Vec<&str> = self.endpoints.iter().map(|e| e.memory.helper).collect();
            format!("{label} ({})", names.join(" / "))
        };
        // Helpers only count where there are some: a pod without a
        // container has none, which is not "0x the other's".
        let one = |f: fn(&Snapshot) -> f64| {
            move |m: &MemoryReport| m.one_pod.as_ref().filter(|s| s.helpers.count > 0).map(f)
        };
        row(
            helper("1 pod: helpers RSS"),
            each(&one(|s| s.helpers.rss_kib as f64)),
            &mut table,
            true,
        );
        row(
            helper("1 pod: helpers PSS"),
            each(&one(|s| s.helpers.pss_kib as f64)),
            &mut table,
            true,
        );
        row(
            helper("1 pod: helpers private"),
            each(&one(|s| s.helpers.private_kib as f64)),
            &mut table,
            true,
        );
        row(
            "1 pod: pod infra RSS".into(),
            each(&|m| {
                m.one_pod
                    .as_ref()
                    .filter(|s| s.infra.count > 0)
                    .map(|s| s.infra.rss_kib as f64)
            }),
            &mut table,
            true,
        );
        if let Some(n) = self.pods {
            row(
                format!("density: daemon RSS at {n} pods"),
                each(&|m| m.density.and_then(|d| rss(d.after.daemon))),
                &mut table,
                comparable,
            );
            row(
                helper(&format!("density: helpers RSS at {n} pods")),
                each(&|m| m.density.map(|d| d.after.helpers.rss_kib as f64)),
                &mut table,
                comparable,
            );
            // One helper's share among N: its binary's shared pages count
            // 1/N each in PSS, and not at all in the private memory.
            row(
                helper(&format!("density: PSS per helper at {n} pods")),
                each(&|m| {
                    m.density
                        .and_then(|d| d.after.helpers.per_member(d.after.helpers.pss_kib))
                }),
                &mut table,
                comparable,
            );
            row(
                helper(&format!("density: private per helper at {n} pods")),
                each(&|m| {
                    m.density
                        .and_then(|d| d.after.helpers.per_member(d.after.helpers.private_kib))
                }),
                &mut table,
                comparable,
            );
            row(
                format!("density: pod infra RSS at {n} pods"),
                each(&|m| m.density.map(|d| d.after.infra.rss_kib as f64)),
                &mut table,
                comparable,
            );
            row(
                "density: overhead per pod (RSS)".into(),
                each(&|m| m.density.map(|d| d.per_pod_rss_kib)),
                &mut table,
                comparable,
            );
            row(
                "density: overhead per pod (PSS)".into(),
                each(&|m| m.density.map(|d| d.per_pod_pss_kib)),
                &mut table,
                comparable,
            );
        }
        if table.is_empty() {
            return "memory: no daemon process found\n".to_string();
        }
        table.render()
    }

    fn pull_table(&self) -> String {
        let mut headers = vec!["pull".to_string()];
        headers.extend(self.endpoints.iter().map(|e| e.name.clone()));
        if let [a, b] = self.endpoints.as_slice() {
            headers.push(format!("{}/{}", a.name, b.name));
        }
        let mut table = Table::new(headers);
        let values: Vec<Option<&PullStats>> =
            self.endpoints.iter().map(|e| e.pull.as_ref()).collect();
        let mut add =
            |label: &str, f: &dyn Fn(&PullStats) -> Option<f64>, fmt: &dyn Fn(f64) -> String| {
                let vals: Vec<Option<f64>> = values.iter().map(|p| p.and_then(f)).collect();
                let mut cells = vec![label.to_string()];
                cells.extend(vals.iter().map(|v| v.map_or("-".to_string(), fmt)));
                if let [Some(a), Some(b)] = vals.as_slice() {
                    cells.push(format_ratio(ratio(*a, *b)));
                } else if vals.len() == 2 {
                    cells.push("-".to_string());
                }
                table.row(cells);
            };
        add(
            "image size (as reported)",
            &|p| Some(p.size_bytes as f64),
            &|v| format!("{:.1}MB", v / 1e6),
        );
        add("throughput at median", &|p| p.median_mb_per_s, &|v| {
            format!("{v:.1}MB/s")
        });
        add("throughput at best", &|p| p.best_mb_per_s, &|v| {
            format!("{v:.1}MB/s")
        });
        table.render()
    }
}

impl EndpointReport {
    /// Its pods got containers (CreateContainer and StartContainer work).
    fn with_containers(&self) -> bool {
        !self
            .skipped
            .iter()
            .any(|f| f.op == "CreateContainer" || f.op == "StartContainer")
    }
}

fn endpoint_report(t: Target, cleanup: Cleanup) -> EndpointReport {
    let name = t.name();
    let operations: Vec<OpStats> = t
        .ops
        .iter()
        .filter_map(|(op, samples)| {
            let s = Summary::of(samples)?;
            Some(OpStats {
                op: op.clone(),
                n: s.n,
                median_ms: ms(s.median),
                p99_ms: ms(s.p99),
                min_ms: ms(s.min),
                max_ms: ms(s.max),
                mean_ms: ms(s.mean),
                summary: s,
            })
        })
        .collect();
    let pull = t.image_size.and_then(|size| {
        let o = operations.iter().find(|o| o.op == "PullImage")?;
        Some(PullStats {
            size_bytes: size,
            median_mb_per_s: megabytes_per_second(size, o.summary.median),
            best_mb_per_s: megabytes_per_second(size, o.summary.min),
        })
    });
    EndpointReport {
        url: t.url,
        runtime_name: t.runtime_name,
        runtime_version: t.runtime_version,
        daemon_pid: t.daemon_pid,
        daemon_found_by: t.daemon_found_by,
        operations,
        memory: t.memory,
        pull,
        failure: t.failure,
        skipped: t.skipped,
        cleanup,
        notes: t.notes,
        name,
    }
}

/// Operation names across endpoints, each endpoint's order kept.
fn op_names(endpoints: &[EndpointReport]) -> Vec<String> {
    merge_order(
        endpoints
            .iter()
            .map(|e| e.operations.iter().map(|o| o.op.as_str()).collect()),
    )
}

/// Merges sequences keeping each one's order: a name one list lacks goes
/// right after the name it follows in the list that has it
/// (RunPodSandbox, [CreateContainer, ...], StopPodSandbox).
fn merge_order<'a>(lists: impl IntoIterator<Item = Vec<&'a str>>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for list in lists {
        let mut at = 0;
        for name in list {
            match names.iter().position(|n| n == name) {
                Some(i) => at = i + 1,
                None => {
                    names.insert(at, name.to_string());
                    at += 1;
                }
            }
        }
    }
    names
}

fn compare(a: &EndpointReport, b: &EndpointReport) -> Vec<Comparison> {
    op_names(std::slice::from_ref(a))
        .into_iter()
        .filter_map(|op| {
            let x = a.operations.iter().find(|o| o.op == op)?;
            let y = b.operations.iter().find(|o| o.op == op)?;
            Some(Comparison {
                op,
                median_ratio: duration_ratio(x.summary.median, y.summary.median),
                p99_ratio: duration_ratio(x.summary.p99, y.summary.p99),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_one_endpoint_lacks_keep_the_other_endpoints_order() {
        let pods_only = vec!["RunPodSandbox", "StopPodSandbox", "RemovePodSandbox"];
        let full = vec![
            "RunPodSandbox",
            "CreateContainer",
            "StartContainer",
            "StopPodSandbox",
            "RemovePodSandbox",
            "pod start",
        ];
        assert_eq!(
            merge_order([pods_only, full]),
            [
                "RunPodSandbox",
                "CreateContainer",
                "StartContainer",
                "StopPodSandbox",
                "RemovePodSandbox",
                "pod start"
            ]
        );
        assert_eq!(
            merge_order([vec!["b", "c"], vec!["a", "b"]]),
            ["a", "b", "c"]
        );
    }
}
