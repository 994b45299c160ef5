//! Run reports: the verdicts of the checkers over a [`RunRecord`] as JSON,
//! a human summary (text) and a self-contained SVG timeline (link faults as
//! bars, connectivity per node pair, node downtime, the convergence point,
//! a verdict per checker).
//!
//! Exit code convention of the `chaos` binary (see [`crate::check::exit_code`]):
//! 0 pass, 1 fail, 2 error or undecidable.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::check::{self, RunRecord, Status, Verdict};
use crate::scenario::{FaultSpan, Link, NodeSpan};

/// Errors writing a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A file could not be written.
    #[error("cannot write {file}: {source}")]
    Write {
        /// The file.
        file: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The report could not be serialised.
    #[error("cannot serialise the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// Connectivity of a node pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Connectivity {
    /// Both directions carry traffic.
    Up,
    /// Only `b` hears `a` (`b -> a` is cut).
    OnlyAToB,
    /// Only `a` hears `b` (`a -> b` is cut).
    OnlyBToA,
    /// Neither direction, or a node is down.
    Down,
}

/// Connectivity of a link over a span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectivitySpan {
    /// The link.
    pub link: Link,
    /// Its state.
    pub state: Connectivity,
    /// Start, ms.
    pub from_ms: i64,
    /// End, ms.
    pub to_ms: i64,
}

/// The full report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Overall status.
    pub overall: Status,
    /// Exit code for that status.
    pub exit_code: i32,
    /// One verdict per checker.
    pub verdicts: Vec<Verdict>,
    /// Length of the fault phase.
    pub duration_ms: i64,
    /// End of observation.
    pub end_ms: i64,
    /// When the fleet converged, if it did.
    pub converged_at_ms: Option<i64>,
    /// Link faults.
    pub faults: Vec<FaultSpan>,
    /// Node downtime.
    pub downtime: Vec<NodeSpan>,
    /// Connectivity per link over time.
    pub connectivity: Vec<ConnectivitySpan>,
}

/// Run the checkers and assemble the report. Connectivity rows cover
/// `record.links` and every link a fault mentions.
pub fn build(record: &RunRecord) -> Report {
    let verdicts = check::run_checks(record);
    let overall = check::overall(&verdicts);
    let o = &record.observations;
    let end_ms = record
        .duration_ms
        .max(o.end_ms)
        .max(o.converged_at_ms.unwrap_or(0))
        .max(1);
    let mut all_links: BTreeSet<Link> = record.links.iter().cloned().collect();
    all_links.extend(record.faults.iter().map(|f| f.link.clone()));
    let connectivity = all_links
        .iter()
        .flat_map(|l| connectivity_of(l, &record.faults, &o.downtime, end_ms))
        .collect();
    Report {
        scenario: record.scenario.clone(),
        seed: record.seed,
        overall,
        exit_code: check::exit_code(overall),
        verdicts,
        duration_ms: record.duration_ms,
        end_ms,
        converged_at_ms: o.converged_at_ms,
        faults: record.faults.clone(),
        downtime: o.downtime.clone(),
        connectivity,
    }
}

fn connectivity_of(
    link: &Link,
    faults: &[FaultSpan],
    down: &[NodeSpan],
    end: i64,
) -> Vec<ConnectivitySpan> {
    let parts: Vec<&FaultSpan> = faults
        .iter()
        .filter(|f| &f.link == link && f.kind == "partition")
        .collect();
    let downs: Vec<&NodeSpan> = down
        .iter()
        .filter(|d| d.node == link.a || d.node == link.b)
        .collect();
    let mut points: BTreeSet<i64> = [0, end].into_iter().collect();
    for p in &parts {
        points.insert(p.from_ms.clamp(0, end));
        points.insert(p.to_ms.clamp(0, end));
    }
    for d in &downs {
        points.insert(d.from_ms.clamp(0, end));
        points.insert(d.to_ms.clamp(0, end));
    }
    let points: Vec<i64> = points.into_iter().collect();
    let mut out: Vec<ConnectivitySpan> = Vec::new();
    for w in points.windows(2) {
        let (from, to) = (w[0], w[1]);
        let within = |a: i64, b: i64| a <= from && to <= b;
        let cut = |dir: &str| {
            parts
                .iter()
                .any(|p| p.direction == dir && within(p.from_ms, p.to_ms))
        };
        let node_down = downs.iter().any(|d| within(d.from_ms, d.to_ms));
        let state = match (node_down, cut("a-to-b"), cut("b-to-a")) {
            (true, _, _) | (false, true, true) => Connectivity::Down,
            (false, true, false) => Connectivity::OnlyBToA,
            (false, false, true) => Connectivity::OnlyAToB,
            (false, false, false) => Connectivity::Up,
        };
        match out.last_mut() {
            Some(last) if last.state == state && last.to_ms == from => last.to_ms = to,
            _ => out.push(ConnectivitySpan {
                link: link.clone(),
                state,
                from_ms: from,
                to_ms: to,
            }),
        }
    }
    out
}

/// The human summary.
pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scenario {} (seed {}): {}",
        r.scenario,
        r.seed,
        r.overall.as_str().to_uppercase()
    );
    let _ = writeln!(
        s,
        "fault phase {} ms, observed until {} ms, converged {}",
        r.duration_ms,
        r.end_ms,
        r.converged_at_ms
            .map_or("never".to_string(), |t| format!("at {t} ms"))
    );
    for f in &r.faults {
        let _ = writeln!(
            s,
            "  fault {} {} {}: {}..{} ms",
            f.link, f.direction, f.label, f.from_ms, f.to_ms
        );
    }
    for d in &r.downtime {
        let _ = writeln!(s, "  down {}: {}..{} ms", d.node, d.from_ms, d.to_ms);
    }
    for v in &r.verdicts {
        let _ = writeln!(
            s,
            "[{}] {}: {}",
            v.status.as_str().to_uppercase(),
            v.checker,
            v.summary
        );
        for e in v.evidence.iter().take(50) {
            let _ = writeln!(s, "    - {}", e.describe());
        }
        if v.evidence.len() > 50 {
            let _ = writeln!(
                s,
                "    ... and {} more (see report.json)",
                v.evidence.len() - 50
            );
        }
    }
    let _ = writeln!(s, "exit code {}", r.exit_code);
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fault_colour(kind: &str) -> &'static str {
    match kind {
        "partition" => "#d62728",
        "loss" => "#ff7f0e",
        "delay" => "#9467bd",
        "duplicate" => "#8c564b",
        "reorder" => "#e377c2",
        "bandwidth" => "#17becf",
        _ => "#7f7f7f",
    }
}

fn status_colour(s: Status) -> &'static str {
    match s {
        Status::Pass => "#2ca02c",
        Status::Fail => "#d62728",
        Status::Unknown => "#bcbd22",
    }
}

/// The timeline picture, a self-contained SVG document.
pub fn render_svg(r: &Report) -> String {
    const LEFT: f64 = 300.0;
    const WIDTH: f64 = 800.0;
    const ROW: f64 = 22.0;
    let end = r.end_ms.max(1) as f64;
    let x = |t: i64| LEFT + (t.clamp(0, r.end_ms) as f64 / end) * WIDTH;
    let mut body = String::new();
    let mut y = 40.0;
    let section = |body: &mut String, y: &mut f64, title: &str| {
        *y += 10.0;
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" font-weight="bold">{}</text>"#,
            *y + 14.0,
            esc(title)
        );
        *y += ROW;
    };
    // Link faults: one row per (link, direction).
    section(&mut body, &mut y, "link faults");
    let rows: BTreeSet<(String, String)> = r
        .faults
        .iter()
        .map(|f| (f.link.to_string(), f.direction.clone()))
        .collect();
    for (link, dir) in &rows {
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" font-size="11">{} {}</text>"#,
            y + 14.0,
            esc(link),
            esc(dir)
        );
        let fs: Vec<&FaultSpan> = r
            .faults
            .iter()
            .filter(|f| &f.link.to_string() == link && &f.direction == dir)
            .collect();
        let n = fs.len().max(1) as f64;
        for (i, f) in fs.iter().enumerate() {
            let h = (ROW - 4.0) / n;
            let (x0, x1) = (x(f.from_ms), x(f.to_ms));
            let _ = writeln!(
                body,
                r#"<rect class="fault" x="{x0:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}: {} {}..{} ms</title></rect>"#,
                y + 2.0 + h * i as f64,
                (x1 - x0).max(1.0),
                fault_colour(&f.kind),
                esc(&f.link.to_string()),
                esc(&f.label),
                f.from_ms,
                f.to_ms
            );
            if x1 - x0 > 7.0 * f.label.chars().count() as f64 && h >= 9.0 {
                let _ = writeln!(
                    body,
                    r#"<text x="{:.1}" y="{:.1}" font-size="{:.0}" fill="white">{}</text>"#,
                    x0 + 3.0,
                    y + 1.0 + h * (i as f64 + 1.0) - 1.5,
                    (h - 1.0).min(11.0),
                    esc(&f.label)
                );
            }
        }
        y += ROW;
    }
    if rows.is_empty() {
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" font-size="11">none</text>"#,
            y + 14.0
        );
        y += ROW;
    }
    section(
        &mut body,
        &mut y,
        "connectivity (green up, orange one-way, red down)",
    );
    let links: BTreeSet<String> = r.connectivity.iter().map(|c| c.link.to_string()).collect();
    for l in &links {
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" font-size="11">{}</text>"#,
            y + 14.0,
            esc(l)
        );
        for c in r.connectivity.iter().filter(|c| &c.link.to_string() == l) {
            let (colour, what) = match c.state {
                Connectivity::Up => ("#2ca02c", "up"),
                Connectivity::OnlyAToB => ("#ff7f0e", "one-way a->b"),
                Connectivity::OnlyBToA => ("#ff7f0e", "one-way b->a"),
                Connectivity::Down => ("#d62728", "down"),
            };
            let (x0, x1) = (x(c.from_ms), x(c.to_ms));
            let _ = writeln!(
                body,
                r#"<rect class="conn" x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {} {}..{} ms</title></rect>"#,
                y + 4.0,
                (x1 - x0).max(1.0),
                ROW - 8.0,
                esc(l),
                esc(what),
                c.from_ms,
                c.to_ms
            );
        }
        y += ROW;
    }
    section(&mut body, &mut y, "node downtime");
    for d in &r.downtime {
        let (x0, x1) = (x(d.from_ms), x(d.to_ms));
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" font-size="11">{}</text>"#,
            y + 14.0,
            esc(&d.node)
        );
        let _ = writeln!(
            body,
            r##"<rect class="down" x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#555"><title>{} down {}..{} ms</title></rect>"##,
            y + 4.0,
            (x1 - x0).max(1.0),
            ROW - 8.0,
            esc(&d.node),
            d.from_ms,
            d.to_ms
        );
        y += ROW;
    }
    if r.downtime.is_empty() {
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" font-size="11">none</text>"#,
            y + 14.0
        );
        y += ROW;
    }
    let chart_bottom = y;
    // Time axis, drawn under everything else.
    let mut axis = String::new();
    let step = nice_step(r.end_ms);
    let mut t = 0;
    while t <= r.end_ms {
        let _ = writeln!(
            axis,
            r##"<line x1="{0:.1}" y1="30" x2="{0:.1}" y2="{chart_bottom:.0}" stroke="#ddd"/><text x="{0:.1}" y="24" font-size="10" text-anchor="middle">{1}s</text>"##,
            x(t),
            t as f64 / 1000.0
        );
        t += step;
    }
    if let Some(c) = r.converged_at_ms {
        let _ = writeln!(
            body,
            r##"<line id="converged" x1="{0:.1}" y1="30" x2="{0:.1}" y2="{chart_bottom:.0}" stroke="#1f77b4" stroke-width="2" stroke-dasharray="6,3"/><text x="{0:.1}" y="{1:.0}" font-size="11" fill="#1f77b4">converged {2} ms</text>"##,
            x(c),
            chart_bottom + 14.0,
            c
        );
    }
    y = chart_bottom + 30.0;
    // Verdicts.
    let _ = writeln!(
        body,
        r#"<text x="10" y="{:.0}" font-weight="bold">verdict: {}</text>"#,
        y + 14.0,
        r.overall.as_str().to_uppercase()
    );
    y += ROW + 4.0;
    for v in &r.verdicts {
        let _ = writeln!(
            body,
            r#"<g class="verdict" data-checker="{0}" data-status="{1}"><rect x="10" y="{2:.0}" width="70" height="18" rx="3" fill="{3}"/><text x="45" y="{4:.0}" font-size="11" fill="white" text-anchor="middle">{1}</text><text x="90" y="{4:.0}" font-size="12">{0}: {5}</text></g>"#,
            esc(&v.checker),
            v.status.as_str(),
            y,
            status_colour(v.status),
            y + 13.0,
            esc(&v.summary)
        );
        y += ROW;
        for e in v.evidence.iter().take(5) {
            let _ = writeln!(
                body,
                r##"<text x="100" y="{:.0}" font-size="10" fill="#444">{}</text>"##,
                y + 12.0,
                esc(&truncate(&e.describe(), 170))
            );
            y += 16.0;
        }
        if v.evidence.len() > 5 {
            let _ = writeln!(
                body,
                r##"<text x="100" y="{:.0}" font-size="10" fill="#444">... {} more in report.json</text>"##,
                y + 12.0,
                v.evidence.len() - 5
            );
            y += 16.0;
        }
    }
    let height = y + 20.0;
    let mut legend = String::new();
    let mut lx = LEFT;
    for kind in [
        "partition",
        "loss",
        "delay",
        "duplicate",
        "reorder",
        "bandwidth",
    ] {
        let _ = writeln!(
            legend,
            r#"<rect x="{lx:.0}" y="36" width="10" height="10" fill="{}"/><text x="{:.0}" y="45" font-size="10">{kind}</text>"#,
            fault_colour(kind),
            lx + 13.0
        );
        lx += 85.0;
    }
    let total_w = LEFT + WIDTH + 40.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{total_w:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {total_w:.0} {height:.0}\" font-family=\"sans-serif\">\n<title>chaos run {}: {}</title>\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{} (seed {})</text>\n{axis}{legend}{body}</svg>\n",
        esc(&r.scenario),
        r.overall.as_str(),
        esc(&r.scenario),
        r.seed
    )
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push('…');
        t
    }
}

fn nice_step(end_ms: i64) -> i64 {
    let target = (end_ms / 10).max(1);
    for step in [
        100, 250, 500, 1000, 2000, 5000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000,
        1_800_000, 3_600_000,
    ] {
        if step >= target {
            return step;
        }
    }
    3_600_000 * ((target / 3_600_000) + 1)
}

/// Write `report.json`, `summary.txt` and `timeline.svg` into `dir`
/// (created if missing). Returns the files written.
pub fn write_all(r: &Report, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
        file: dir.to_path_buf(),
        source,
    })?;
    let files = [
        ("report.json", serde_json::to_string_pretty(r)?),
        ("summary.txt", render_text(r)),
        ("timeline.svg", render_svg(r)),
    ];
    let mut out = Vec::new();
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|source| ReportError::Write {
            file: p.clone(),
            source,
        })?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link {
            a: "s/edge-1".into(),
            b: "hub".into(),
        }
    }

    fn span(dir: &str, from: i64, to: i64) -> FaultSpan {
        FaultSpan {
            link: link(),
            direction: dir.into(),
            kind: "partition".into(),
            label: "partition".into(),
            from_ms: from,
            to_ms: to,
        }
    }

    #[test]
    fn connectivity_follows_partitions_and_downtime() {
        let faults = [span("a-to-b", 10, 30), span("b-to-a", 20, 30)];
        let down = [NodeSpan {
            node: "hub".into(),
            from_ms: 40,
            to_ms: 50,
        }];
        let c = connectivity_of(&link(), &faults, &down, 60);
        let got: Vec<(Connectivity, i64, i64)> =
            c.iter().map(|c| (c.state, c.from_ms, c.to_ms)).collect();
        assert_eq!(
            got,
            [
                (Connectivity::Up, 0, 10),
                (Connectivity::OnlyBToA, 10, 20),
                (Connectivity::Down, 20, 30),
                (Connectivity::Up, 30, 40),
                (Connectivity::Down, 40, 50),
                (Connectivity::Up, 50, 60),
            ]
        );
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(60_000), 10_000);
        assert_eq!(nice_step(1000), 100);
        assert!(nice_step(100 * 3_600_000) >= 10 * 3_600_000);
    }
}
