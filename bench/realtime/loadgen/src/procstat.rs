//! CPU time and memory of processes and of the machine, from `/proc`.
//!
//! The machine is shared (2 cores, other builds running): each measured window records the server's
//! CPU, the load generator's own CPU and the whole machine's busy time, so "other" load during the
//! window can be read off afterwards.

use std::time::Instant;

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of `pid` (all threads), seconds; `None` when the process is gone.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|(user, sys)| user + sys)
}

/// (utime, stime) of `pid` (all threads), seconds: the kernel's share is where socket writes go.
pub fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime / ticks_per_sec(), stime / ticks_per_sec()))
}

/// A `VmRSS`/`VmHWM`-style field of `/proc/<pid>/status`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Busy and total jiffies of the whole machine (all cores).
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// Own CPU time (all threads), seconds.
pub fn own_cpu_secs() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

/// CPU time of the kernel's softirq threads (`ksoftirqd/N`), seconds: network receive work the kernel
/// defers there under load is charged to neither the server nor the load generator.
fn ksoftirqd_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("ksoftirqd"))
        })
        .filter_map(cpu_secs)
        .sum()
}

/// CPU readings at one instant; two of them make a window.
#[derive(Clone, Copy)]
pub struct Snapshot {
    at: Instant,
    server: f64,
    server_sys: f64,
    own: f64,
    ksoftirqd: f64,
    machine_busy: f64,
    machine_total: f64,
}

impl Snapshot {
    pub fn take(server_pid: u32) -> Snapshot {
        let (machine_busy, machine_total) = machine_jiffies();
        let (user, sys) = cpu_split(server_pid).unwrap_or((f64::NAN, f64::NAN));
        Snapshot {
            at: Instant::now(),
            server: user + sys,
            server_sys: sys,
            own: own_cpu_secs(),
            ksoftirqd: ksoftirqd_secs(),
            machine_busy,
            machine_total,
        }
    }
}

/// CPU use between two snapshots, in cores (1.0 = one core busy all the time).
pub struct Window {
    pub secs: f64,
    pub server_cores: f64,
    pub loadgen_cores: f64,
    pub machine_cores: f64,
    pub ksoftirqd_cores: f64,
    pub server_cpu_secs: f64,
    /// Share of the server's CPU spent in the kernel.
    pub server_sys_share: f64,
}

impl Window {
    pub fn between(a: Snapshot, b: Snapshot) -> Window {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let cores = (b.machine_total - a.machine_total) / ticks_per_sec() / secs;
        let busy_share = (b.machine_busy - a.machine_busy) / (b.machine_total - a.machine_total);
        Window {
            secs,
            server_cores: (b.server - a.server) / secs,
            loadgen_cores: (b.own - a.own) / secs,
            machine_cores: busy_share * cores,
            ksoftirqd_cores: (b.ksoftirqd - a.ksoftirqd) / secs,
            server_cpu_secs: b.server - a.server,
            server_sys_share: (b.server_sys - a.server_sys) / (b.server - a.server),
        }
    }
}
