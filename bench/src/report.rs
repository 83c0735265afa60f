//! The comparison's figures and how they are printed: a Markdown table per round plus the
//! median, a latency table, and `RESULT key=value` lines.

use std::fmt::Write as _;

/// One server's throughput run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throughput {
    /// smtp-sink: accepted msg/s; a server: delivered (or relayed) msg/s.
    pub per_s: f64,
    /// End of DATA to reply under load.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Every message accepted and every accepted message delivered (or relayed) in time.
    pub complete: bool,
}

/// One server's single-session latency run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The figures of one round (or the medians of all rounds).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Round {
    pub sink: Throughput,
    pub estafeta: Throughput,
    pub postfix: Option<Throughput>,
    pub sink_lat: Latency,
    pub estafeta_lat: Latency,
    pub postfix_lat: Option<Latency>,
}

/// Median of the values (the mean of the two middle ones for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The median of every figure over the rounds (each column on its own); `complete` only if
/// every round was. Postfix figures only if every round has them.
pub fn median_round(rounds: &[Round]) -> Round {
    let med = |f: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let m = |f: &dyn Fn(&Round) -> f64| med(f).unwrap_or(0.0);
    let thr = |pick: &dyn Fn(&Round) -> Option<Throughput>| -> Option<Throughput> {
        let all: Option<Vec<Throughput>> = rounds.iter().map(pick).collect();
        let all = all.filter(|a| !a.is_empty())?;
        let col = |f: fn(&Throughput) -> f64| {
            median(&all.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
        };
        Some(Throughput {
            per_s: col(|t| t.per_s),
            p50_ms: col(|t| t.p50_ms),
            p99_ms: col(|t| t.p99_ms),
            complete: all.iter().all(|t| t.complete),
        })
    };
    let postfix_lat = if !rounds.is_empty() && rounds.iter().all(|r| r.postfix_lat.is_some()) {
        Some(Latency {
            p50_ms: m(&|r| r.postfix_lat.map_or(0.0, |l| l.p50_ms)),
            p99_ms: m(&|r| r.postfix_lat.map_or(0.0, |l| l.p99_ms)),
        })
    } else {
        None
    };
    Round {
        sink: thr(&|r| Some(r.sink)).unwrap_or_default(),
        estafeta: thr(&|r| Some(r.estafeta)).unwrap_or_default(),
        postfix: thr(&|r| r.postfix),
        sink_lat: Latency {
            p50_ms: m(&|r| r.sink_lat.p50_ms),
            p99_ms: m(&|r| r.sink_lat.p99_ms),
        },
        estafeta_lat: Latency {
            p50_ms: m(&|r| r.estafeta_lat.p50_ms),
            p99_ms: m(&|r| r.estafeta_lat.p99_ms),
        },
        postfix_lat,
    }
}

/// `a / b`, or `None` when `b` is zero.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// A rate rounded to an integer with thousands separators: `12,671`.
pub fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let n = x.round().abs() as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if x.round() < 0.0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}"))
}

fn server_cell(t: &Throughput) -> String {
    format!(
        "{}{} ({:.2} / {:.2} ms)",
        thousands(t.per_s),
        if t.complete { "" } else { "*" },
        t.p50_ms,
        t.p99_ms
    )
}

/// The throughput table: one row per round, then the medians. Ratios in the median row are
/// ratios of the medians. `relay` names the servers' column "relayed" instead of "delivered".
pub fn throughput_table(rounds: &[Round], relay: bool) -> String {
    let with_postfix = rounds.iter().any(|r| r.postfix.is_some());
    let what = if relay { "relayed" } else { "delivered" };
    let mut s = String::new();
    let _ = write!(
        s,
        "| round | smtp-sink accepted msg/s | estafeta {what} msg/s (p50 / p99) |"
    );
    if with_postfix {
        let _ = write!(s, " Postfix {what} msg/s (p50 / p99) |");
    }
    s.push_str(" estafeta / sink |");
    if with_postfix {
        s.push_str(" Postfix / sink | estafeta / Postfix |");
    }
    s.push('\n');
    let cols = if with_postfix { 7 } else { 4 };
    s.push('|');
    s.push_str(&"---|".repeat(cols));
    s.push('\n');
    let median = median_round(rounds);
    let labelled = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| ((i + 1).to_string(), r))
        .chain(std::iter::once(("median".to_string(), &median)));
    for (label, r) in labelled {
        let _ = write!(
            s,
            "| {label} | {} | {} |",
            thousands(r.sink.per_s),
            server_cell(&r.estafeta)
        );
        if with_postfix {
            let cell = r.postfix.as_ref().map_or_else(|| "-".into(), server_cell);
            let _ = write!(s, " {cell} |");
        }
        let _ = write!(
            s,
            " {} |",
            ratio_cell(ratio(r.estafeta.per_s, r.sink.per_s))
        );
        if with_postfix {
            let pf = r.postfix.map(|p| p.per_s);
            let _ = write!(
                s,
                " {} | {} |",
                ratio_cell(pf.and_then(|p| ratio(p, r.sink.per_s))),
                ratio_cell(pf.and_then(|p| ratio(r.estafeta.per_s, p)))
            );
        }
        s.push('\n');
    }
    s
}

fn lat_cell(l: &Latency) -> String {
    format!("{:.2} / {:.2} ms", l.p50_ms, l.p99_ms)
}

/// The single-session latency table (p50 / p99 per round, then the medians).
pub fn latency_table(rounds: &[Round]) -> String {
    let with_postfix = rounds.iter().any(|r| r.postfix_lat.is_some());
    let mut s = String::from("| round | smtp-sink p50 / p99 | estafeta p50 / p99 |");
    if with_postfix {
        s.push_str(" Postfix p50 / p99 |");
    }
    s.push('\n');
    s.push('|');
    s.push_str(&"---|".repeat(if with_postfix { 4 } else { 3 }));
    s.push('\n');
    let median = median_round(rounds);
    let labelled = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| ((i + 1).to_string(), r))
        .chain(std::iter::once(("median".to_string(), &median)));
    for (label, r) in labelled {
        let _ = write!(
            s,
            "| {label} | {} | {} |",
            lat_cell(&r.sink_lat),
            lat_cell(&r.estafeta_lat)
        );
        if with_postfix {
            let cell = r.postfix_lat.as_ref().map_or_else(|| "-".into(), lat_cell);
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }
    s
}

/// The workload, for the RESULT lines.
pub struct Workload {
    pub messages: u64,
    pub size: usize,
    pub sessions: u64,
    pub relay: bool,
}

/// One `RESULT mode=compare round=LABEL ...` line.
pub fn result_line(label: &str, w: &Workload, r: &Round) -> String {
    let mut s = format!(
        "RESULT mode=compare round={label} relay={} messages={} size={} sessions={} sink_per_s={:.1} estafeta_per_s={:.1} estafeta_p50_ms={:.2} estafeta_p99_ms={:.2} estafeta_complete={}",
        u8::from(w.relay),
        w.messages,
        w.size,
        w.sessions,
        r.sink.per_s,
        r.estafeta.per_s,
        r.estafeta.p50_ms,
        r.estafeta.p99_ms,
        u8::from(r.estafeta.complete),
    );
    if let Some(p) = &r.postfix {
        let _ = write!(
            s,
            " postfix_per_s={:.1} postfix_p50_ms={:.2} postfix_p99_ms={:.2} postfix_complete={}",
            p.per_s,
            p.p50_ms,
            p.p99_ms,
            u8::from(p.complete)
        );
    }
    let opt = |r: Option<f64>| r.map_or_else(|| "-".into(), |r| format!("{r:.3}"));
    let _ = write!(
        s,
        " estafeta_sink={}",
        opt(ratio(r.estafeta.per_s, r.sink.per_s))
    );
    if let Some(p) = &r.postfix {
        let _ = write!(
            s,
            " postfix_sink={} estafeta_postfix={}",
            opt(ratio(p.per_s, r.sink.per_s)),
            opt(ratio(r.estafeta.per_s, p.per_s))
        );
    }
    let _ = write!(
        s,
        " sink_lat_p50_ms={:.2} sink_lat_p99_ms={:.2} estafeta_lat_p50_ms={:.2} estafeta_lat_p99_ms={:.2}",
        r.sink_lat.p50_ms, r.sink_lat.p99_ms, r.estafeta_lat.p50_ms, r.estafeta_lat.p99_ms
    );
    if let Some(l) = &r.postfix_lat {
        let _ = write!(
            s,
            " postfix_lat_p50_ms={:.2} postfix_lat_p99_ms={:.2}",
            l.p50_ms, l.p99_ms
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thr(per_s: f64, p50_ms: f64, p99_ms: f64) -> Throughput {
        Throughput {
            per_s,
            p50_ms,
            p99_ms,
            complete: true,
        }
    }

    fn lat(p50_ms: f64, p99_ms: f64) -> Latency {
        Latency { p50_ms, p99_ms }
    }

    fn rounds() -> Vec<Round> {
        vec![
            Round {
                sink: thr(12671.4, 0.12, 0.6),
                estafeta: thr(3266.0, 2.14, 5.13),
                postfix: Some(thr(670.0, 10.39, 32.08)),
                sink_lat: lat(0.05, 0.08),
                estafeta_lat: lat(0.55, 0.9),
                postfix_lat: Some(lat(0.72, 1.5)),
            },
            Round {
                sink: thr(13129.0, 0.13, 0.61),
                estafeta: thr(798.0, 8.26, 21.23),
                postfix: Some(thr(602.0, 7.78, 29.33)),
                sink_lat: lat(0.06, 0.09),
                estafeta_lat: lat(1.37, 2.0),
                postfix_lat: Some(lat(0.7, 1.4)),
            },
            Round {
                sink: thr(10474.0, 0.11, 0.55),
                estafeta: Throughput {
                    complete: false,
                    ..thr(749.0, 8.95, 22.67)
                },
                postfix: Some(thr(560.0, 9.43, 32.76)),
                sink_lat: lat(0.04, 0.07),
                estafeta_lat: lat(1.2, 1.9),
                postfix_lat: Some(lat(0.8, 1.6)),
            },
        ]
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[2.0, f64::INFINITY, 1.0]), Some(2.0));
    }

    #[test]
    fn median_round_takes_each_column_alone() {
        let m = median_round(&rounds());
        assert_eq!(m.sink.per_s, 12671.4);
        assert_eq!(m.sink.p50_ms, 0.12);
        assert_eq!(m.estafeta.per_s, 798.0);
        assert_eq!(m.estafeta.p50_ms, 8.26);
        assert_eq!(m.estafeta.p99_ms, 21.23);
        assert!(!m.estafeta.complete);
        assert!(m.sink.complete);
        assert_eq!(m.postfix.unwrap().per_s, 602.0);
        assert_eq!(m.postfix.unwrap().p99_ms, 32.08);
        assert_eq!(m.estafeta_lat, lat(1.2, 1.9));
        assert_eq!(m.postfix_lat, Some(lat(0.72, 1.5)));
        assert_eq!(m.sink_lat, lat(0.05, 0.08));

        let mut r = rounds();
        r[1].postfix = None;
        r[1].postfix_lat = None;
        let m = median_round(&r);
        assert_eq!(m.postfix, None);
        assert_eq!(m.postfix_lat, None);
        assert_eq!(median_round(&[]), Round::default());
    }

    #[test]
    fn numbers() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(999.5), "1,000");
        assert_eq!(thousands(12671.4), "12,671");
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(thousands(-1500.0), "-1,500");
        assert_eq!(thousands(f64::NAN), "-");
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
    }

    #[test]
    fn throughput_table_with_postfix() {
        let t = throughput_table(&rounds(), false);
        let expected = "\
| round | smtp-sink accepted msg/s | estafeta delivered msg/s (p50 / p99) | Postfix delivered msg/s (p50 / p99) | estafeta / sink | Postfix / sink | estafeta / Postfix |
|---|---|---|---|---|---|---|
| 1 | 12,671 | 3,266 (2.14 / 5.13 ms) | 670 (10.39 / 32.08 ms) | 0.26 | 0.05 | 4.87 |
| 2 | 13,129 | 798 (8.26 / 21.23 ms) | 602 (7.78 / 29.33 ms) | 0.06 | 0.05 | 1.33 |
| 3 | 10,474 | 749* (8.95 / 22.67 ms) | 560 (9.43 / 32.76 ms) | 0.07 | 0.05 | 1.34 |
| median | 12,671 | 798* (8.26 / 21.23 ms) | 602 (9.43 / 32.08 ms) | 0.06 | 0.05 | 1.33 |
";
        assert_eq!(t, expected);
    }

    #[test]
    fn throughput_table_without_postfix_and_relay() {
        let mut r = rounds();
        r.truncate(1);
        r[0].postfix = None;
        r[0].postfix_lat = None;
        let t = throughput_table(&r, true);
        let expected = "\
| round | smtp-sink accepted msg/s | estafeta relayed msg/s (p50 / p99) | estafeta / sink |
|---|---|---|---|
| 1 | 12,671 | 3,266 (2.14 / 5.13 ms) | 0.26 |
| median | 12,671 | 3,266 (2.14 / 5.13 ms) | 0.26 |
";
        assert_eq!(t, expected);
        let l = latency_table(&r);
        let expected = "\
| round | smtp-sink p50 / p99 | estafeta p50 / p99 |
|---|---|---|
| 1 | 0.05 / 0.08 ms | 0.55 / 0.90 ms |
| median | 0.05 / 0.08 ms | 0.55 / 0.90 ms |
";
        assert_eq!(l, expected);
    }

    #[test]
    fn latency_table_with_postfix() {
        let l = latency_table(&rounds());
        assert!(l.starts_with(
            "| round | smtp-sink p50 / p99 | estafeta p50 / p99 | Postfix p50 / p99 |\n|---|---|---|---|\n"
        ));
        assert!(l.contains("| 2 | 0.06 / 0.09 ms | 1.37 / 2.00 ms | 0.70 / 1.40 ms |\n"));
        assert!(l.ends_with("| median | 0.05 / 0.08 ms | 1.20 / 1.90 ms | 0.72 / 1.50 ms |\n"));
    }

    #[test]
    fn result_lines() {
        let w = Workload {
            messages: 5000,
            size: 4096,
            sessions: 16,
            relay: false,
        };
        let r = rounds();
        assert_eq!(
            result_line("1", &w, &r[0]),
            "RESULT mode=compare round=1 relay=0 messages=5000 size=4096 sessions=16 sink_per_s=12671.4 estafeta_per_s=3266.0 estafeta_p50_ms=2.14 estafeta_p99_ms=5.13 estafeta_complete=1 postfix_per_s=670.0 postfix_p50_ms=10.39 postfix_p99_ms=32.08 postfix_complete=1 estafeta_sink=0.258 postfix_sink=0.053 estafeta_postfix=4.875 sink_lat_p50_ms=0.05 sink_lat_p99_ms=0.08 estafeta_lat_p50_ms=0.55 estafeta_lat_p99_ms=0.90 postfix_lat_p50_ms=0.72 postfix_lat_p99_ms=1.50"
        );
        let mut one = r[2];
        one.postfix = None;
        one.postfix_lat = None;
        let line = result_line("median", &Workload { relay: true, ..w }, &one);
        assert!(line.starts_with("RESULT mode=compare round=median relay=1 "));
        assert!(line.contains(" estafeta_complete=0 estafeta_sink=0.072 sink_lat_p50_ms=0.04 "));
        assert!(!line.contains("postfix"));
    }
}
