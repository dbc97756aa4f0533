//! The tables: medians over rounds of the JSON lines the runs printed, side by side, with the ratios the
//! issue's goals are stated in (delivered rate cozy / Socket.IO ≥ 5, p99 cozy / Socket.IO ≤ 1/3,
//! ≤ 16 KiB per idle connection).

use std::collections::BTreeMap;

use serde_json::Value;

/// "Other load" (cores busy outside the server and the load generator) under which a pair of runs
/// counts as quiet.
const QUIET: f64 = 0.25;

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn f(run: &Value, key: &str) -> f64 {
    run[key].as_f64().unwrap_or(f64::NAN)
}

fn col(runs: &[&Value], key: &str) -> Vec<f64> {
    runs.iter().map(|r| f(r, key)).collect()
}

fn range(v: &[f64], digits: usize) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if v.len() < 2 {
        return String::new();
    }
    format!(" ({lo:.digits$}–{hi:.digits$})")
}

fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// Close codes, failures and error frames of a group of runs, counted.
fn trouble(runs: &[&Value]) -> String {
    let mut all: BTreeMap<String, u64> = BTreeMap::new();
    for r in runs {
        for key in ["ends", "error_frames"] {
            if let Some(m) = r[key].as_object() {
                for (k, v) in m {
                    *all.entry(k.chars().take(60).collect()).or_default() += v.as_u64().unwrap_or(0);
                }
            }
        }
    }
    if all.is_empty() {
        "none".into()
    } else {
        all.iter().map(|(k, v)| format!("{v}× {k}")).collect::<Vec<_>>().join("; ")
    }
}

fn pace(r: &Value) -> String {
    match r["pace"].as_str() {
        Some("rate") => format!("{} msg/s", f(r, "pace_value")),
        Some("window") => format!("window {}", f(r, "pace_value")),
        _ => "?".into(),
    }
}

pub fn print(runs: &[Value]) {
    // Fan-out, grouped by (subscribers, pacing) then system.
    let mut groups: BTreeMap<(u64, String, u64), BTreeMap<String, Vec<&Value>>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r["kind"] == "fanout") {
        let pace_order = if r["pace"] == "rate" { 0 } else { 1 };
        let key = (r["subs"].as_u64().unwrap_or(0), format!("{pace_order}{}", pace(r)), 0);
        groups.entry(key).or_default().entry(r["system"].as_str().unwrap_or("?").to_string()).or_default().push(r);
    }
    if !groups.is_empty() {
        println!("### Fan-out (medians over rounds; min–max in parentheses)\n");
        println!("| subscribers | publishers | pacing | system | rounds | published msg/s | delivered msg/s | p50 ms | p99 ms | missing / dup | closes, errors | server cores | server µs / delivered | of which kernel | loadgen cores | other load (cores) |");
        println!("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |");
        for ((subs, _, _), systems) in &groups {
            for (system, rs) in systems.iter().rev() {
                let delivered = col(rs, "delivered_per_s");
                let p99 = col(rs, "p99_ms");
                println!(
                    "| {subs} | {} | {} | {system} | {} | {} | {}{} | {:.1} | {:.1}{} | {} / {} | {} | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
                    rs[0]["pubs"],
                    pace(rs[0]),
                    rs.len(),
                    thousands(median(col(rs, "publish_per_s"))),
                    thousands(median(delivered.clone())),
                    if rs.len() > 1 {
                        format!(" ({}–{})", thousands(delivered.iter().cloned().fold(f64::INFINITY, f64::min)), thousands(delivered.iter().cloned().fold(0.0, f64::max)))
                    } else {
                        String::new()
                    },
                    median(col(rs, "p50_ms")),
                    median(p99.clone()),
                    range(&p99, 1),
                    col(rs, "missing").iter().sum::<f64>(),
                    col(rs, "duplicates").iter().sum::<f64>(),
                    trouble(rs),
                    median(col(rs, "server_cores")),
                    median(col(rs, "server_us_per_delivered")),
                    match median(col(rs, "server_sys_share")) {
                        x if x.is_finite() => format!("{:.0} %", x * 100.0),
                        _ => "–".to_string(),
                    },
                    median(col(rs, "loadgen_cores")),
                    median(col(rs, "other_cores")),
                );
            }
        }
        println!("\n### Ratios cozy / Socket.IO (of the medians; per round in parentheses)\n");
        println!("Quiet pairs: rounds where the machine's other load stayed under {QUIET} cores during both runs.\n");
        println!("| subscribers | pacing | delivered rate (goal ≥ 5) | p99 latency (goal ≤ 0.33) | server CPU per delivered msg | quiet pairs: delivered rate | quiet pairs: p99 |");
        println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: |");
        for ((subs, _, _), systems) in &groups {
            let (Some(c), Some(s)) = (systems.get("cozy"), systems.get("socket.io")) else {
                continue;
            };
            let pairs = |quiet: bool| -> Vec<(&Value, &Value)> {
                c.iter()
                    .filter_map(|rc| {
                        let rs = s.iter().find(|rs| rs["round"] == rc["round"] && rs["file"] == rc["file"])?;
                        let calm = f(rc, "other_cores") < QUIET && f(rs, "other_cores") < QUIET;
                        (!quiet || calm).then_some((*rc, *rs))
                    })
                    .collect()
            };
            let per_round = |key: &str| -> String {
                let v: Vec<String> = pairs(false).iter().map(|(rc, rs)| format!("{:.2}", f(rc, key) / f(rs, key))).collect();
                if v.len() > 1 {
                    format!(" ({})", v.join(", "))
                } else {
                    String::new()
                }
            };
            let quiet = |key: &str| -> String {
                let v: Vec<String> = pairs(true).iter().map(|(rc, rs)| format!("{:.2}", f(rc, key) / f(rs, key))).collect();
                if v.is_empty() {
                    "none".into()
                } else {
                    v.join(", ")
                }
            };
            let ratio = |key: &str| median(col(c, key)) / median(col(s, key));
            println!(
                "| {subs} | {} | {:.2}{} | {:.2}{} | {:.2}{} | {} | {} |",
                pace(c[0]),
                ratio("delivered_per_s"),
                per_round("delivered_per_s"),
                ratio("p99_ms"),
                per_round("p99_ms"),
                ratio("server_us_per_delivered"),
                per_round("server_us_per_delivered"),
                quiet("delivered_per_s"),
                quiet("p99_ms"),
            );
        }
        println!();
    }

    let mut idle: BTreeMap<(u64, String), Vec<&Value>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r["kind"] == "idle") {
        let system = match (r["system"].as_str().unwrap_or("?"), r["room_size"].as_u64()) {
            ("cozy", Some(0)) => "cozy, hello only (no room)".to_string(),
            ("cozy", Some(n)) => format!("cozy, subscribed (rooms of {n})"),
            (s, _) => format!("{s} (one room)"),
        };
        idle.entry((r["conns"].as_u64().unwrap_or(0), system)).or_default().push(r);
    }
    if !idle.is_empty() {
        println!("### Memory per idle connection (server VmRSS after − before, ÷ connections)\n");
        println!("| system | connections | connected / still open | RSS before MiB | RSS after MiB | KiB per connection (goal ≤ 16) | KiB per connection after malloc_trim / GC | closes, failures |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
        for ((conns, system), rs) in idle.iter() {
            let per = col(rs, "bytes_per_conn").iter().map(|b| b / 1024.0).collect::<Vec<_>>();
            let released = col(rs, "bytes_per_conn_released").iter().map(|b| b / 1024.0).collect::<Vec<_>>();
            println!(
                "| {system} | {conns} | {} / {} | {:.1} | {:.1} | {:.1}{} | {:.1}{} | {} |",
                median(col(rs, "connected")),
                median(col(rs, "still_open")),
                median(col(rs, "rss_before_kib")) / 1024.0,
                median(col(rs, "rss_after_kib")) / 1024.0,
                median(per.clone()),
                range(&per, 1),
                median(released.clone()),
                range(&released, 1),
                trouble(rs),
            );
        }
        println!();
    }
}
