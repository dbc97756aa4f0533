//! Per-process CPU and memory, read from Linux `/proc`.
//!
//! The master samples each worker periodically: `cozy status` shows the CPU share and resident memory, and
//! `--max-memory` recycles a worker whose RSS has grown past the limit. Two readings of the cumulative CPU
//! time make a rate, so a [`Sample`] carries the instant it was taken and [`cpu_percent`] does the
//! arithmetic; nothing here keeps state between calls.
//!
//! Linux only: the numbers come from `/proc/PID/stat` and `/proc/PID/statm`, whose units (clock ticks and
//! pages) are converted with `sysconf`, never assumed.

use std::io;
use std::sync::OnceLock;
use std::time::Instant;

/// One reading of a process's resource use.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// CPU time used so far, user plus system, in clock ticks (`utime + stime` from `/proc/PID/stat`).
    pub cpu_ticks: u64,
    /// Resident set size: resident pages from `/proc/PID/statm` times the page size.
    pub rss_bytes: u64,
    /// When the reading was taken, so two samples give a rate.
    pub taken: Instant,
}

/// Read a process's CPU time and resident memory.
///
/// Fails with [`io::ErrorKind::NotFound`] when the process does not exist (or vanished while being read),
/// and with [`io::ErrorKind::InvalidData`] if `/proc` says something this parser does not understand.
pub fn sample(pid: u32) -> io::Result<Sample> {
    let stat = parse_stat(&read_proc(pid, "stat")?)?;
    let taken = Instant::now();
    let resident_pages = parse_statm_resident(&read_proc(pid, "statm")?)?;
    Ok(Sample {
        cpu_ticks: stat.cpu_ticks,
        rss_bytes: resident_pages.saturating_mul(page_size()?),
        taken,
    })
}

/// CPU used between two samples of the same process, as a percentage of one core.
///
/// A process busy on two cores reads 200. Returns 0 when no time has passed or when `now` is not after
/// `prev`, and never goes negative: if the pid was reused by a fresh process, its counter restarts lower.
pub fn cpu_percent(prev: &Sample, now: &Sample) -> f64 {
    let elapsed = now
        .taken
        .saturating_duration_since(prev.taken)
        .as_secs_f64();
    if elapsed <= 0.0 {
        return 0.0;
    }
    let ticks = now.cpu_ticks.saturating_sub(prev.cpu_ticks) as f64;
    ticks / clock_ticks_per_second() / elapsed * 100.0
}

/// Whether the process exists and is still running: an exited child that has not been reaped yet (a zombie)
/// still has a `/proc` entry, but it is not alive.
pub fn alive(pid: u32) -> bool {
    match read_proc(pid, "stat").and_then(|text| parse_stat(&text)) {
        // `X` (dead) is only ever seen in the instant before the entry disappears.
        Ok(stat) => !matches!(stat.state, 'Z' | 'X'),
        Err(_) => false,
    }
}

/// The fields of `/proc/PID/stat` this module uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    cpu_ticks: u64,
}

/// Parse `/proc/PID/stat`: `pid (comm) state ppid … utime stime …`.
///
/// `comm` is the executable name chosen by whoever started the process, so it may contain spaces and
/// parentheses; the only safe anchor is the *last* `)`. Everything after it is space-separated numbers,
/// starting with field 3 (state).
fn parse_stat(text: &str) -> io::Result<Stat> {
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/PID/stat format: {text:?}"),
        )
    };
    let (_, after_comm) = text.rsplit_once(')').ok_or_else(invalid)?;
    // Field n (1-based, as in proc(5)) is at index n - 3 after the comm.
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied().ok_or_else(invalid);
    let number = |n: usize| field(n)?.parse::<u64>().map_err(|_| invalid());

    let mut state = field(3)?.chars();
    let (Some(state), None) = (state.next(), state.next()) else {
        return Err(invalid());
    };
    let utime = number(14)?;
    let stime = number(15)?;
    Ok(Stat {
        state,
        cpu_ticks: utime.saturating_add(stime),
    })
}

/// Parse `/proc/PID/statm`: `size resident shared text lib data dt`, all in pages.
fn parse_statm_resident(text: &str) -> io::Result<u64> {
    text.split_whitespace()
        .nth(1)
        .and_then(|resident| resident.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected /proc/PID/statm format: {text:?}"),
            )
        })
}

fn read_proc(pid: u32, file: &str) -> io::Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|err| {
        // A process that exits between opening its directory and reading the file yields ESRCH; to the
        // caller that is the same situation as a pid that was never there.
        if err.raw_os_error() == Some(libc::ESRCH) {
            io::Error::new(io::ErrorKind::NotFound, err)
        } else {
            err
        }
    })
}

/// The size of a memory page in bytes (4 KiB on x86-64, but 16 or 64 KiB on some arm64 and ppc64 kernels).
fn page_size() -> io::Result<u64> {
    static PAGE_SIZE: OnceLock<libc::c_long> = OnceLock::new();
    // SAFETY: sysconf only reads a configuration value; it has no preconditions.
    let size = *PAGE_SIZE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) });
    u64::try_from(size)
        .ok()
        .filter(|&size| size > 0)
        .ok_or_else(|| io::Error::other("sysconf(_SC_PAGESIZE) failed"))
}

/// How many clock ticks make a second in `/proc/PID/stat` (the kernel's USER_HZ).
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf only reads a configuration value; it has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // USER_HZ is 100 on every mainstream Linux architecture; the fallback only matters if sysconf breaks.
        if ticks > 0 {
            ticks as f64
        } else {
            100.0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sampling_this_process_sees_resident_memory() {
        let sample = sample(std::process::id()).unwrap();
        assert!(sample.rss_bytes > 0, "{sample:?}");
        assert_eq!(sample.rss_bytes % page_size().unwrap(), 0);
    }

    #[test]
    fn cpu_ticks_grow_while_this_process_burns_cpu() {
        let pid = std::process::id();
        let first = sample(pid).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut spin = 0u64;
        let later = loop {
            for i in 0..1_000_000u64 {
                spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(i));
            }
            let later = sample(pid).unwrap();
            assert!(later.cpu_ticks >= first.cpu_ticks);
            if later.cpu_ticks > first.cpu_ticks || Instant::now() > deadline {
                break later;
            }
        };
        assert!(
            later.cpu_ticks > first.cpu_ticks,
            "no CPU time counted after burning CPU: {first:?} then {later:?}"
        );
        assert!(cpu_percent(&first, &later) > 0.0);
    }

    fn pair(ticks: u64, seconds: f64) -> (Sample, Sample) {
        let start = Instant::now();
        let prev = Sample {
            cpu_ticks: 1_000,
            rss_bytes: 0,
            taken: start,
        };
        let now = Sample {
            cpu_ticks: 1_000 + ticks,
            rss_bytes: 0,
            taken: start + Duration::from_secs_f64(seconds),
        };
        (prev, now)
    }

    #[test]
    fn cpu_percent_is_a_share_of_one_core() {
        let hz = clock_ticks_per_second();
        let (prev, now) = pair((2.0 * hz) as u64, 2.0);
        assert!((cpu_percent(&prev, &now) - 100.0).abs() < 1e-9);
        let (prev, now) = pair(hz as u64, 2.0);
        assert!((cpu_percent(&prev, &now) - 50.0).abs() < 1e-9);
        let (prev, now) = pair((3.0 * hz) as u64, 1.0);
        assert!((cpu_percent(&prev, &now) - 300.0).abs() < 1e-9);
    }

    #[test]
    fn cpu_percent_is_zero_for_an_idle_process_or_no_elapsed_time() {
        let (prev, now) = pair(0, 5.0);
        assert_eq!(cpu_percent(&prev, &now), 0.0);
        let (prev, now) = pair(50, 0.0);
        assert_eq!(cpu_percent(&prev, &now), 0.0);
        // Samples passed in the wrong order, or a reused pid whose counter restarted.
        let (prev, now) = pair(50, 1.0);
        assert_eq!(cpu_percent(&now, &prev), 0.0);
    }

    #[test]
    fn stat_is_parsed_after_the_last_parenthesis_of_comm() {
        let line = "4242 (evil) (name ) with spaces) S 1 4242 4242 0 -1 4194560 2000 0 3 0 \
                    1234 567 0 0 20 0 4 0 100 123456789 2048 18446744073709551615\n";
        assert_eq!(
            parse_stat(line).unwrap(),
            Stat {
                state: 'S',
                cpu_ticks: 1234 + 567,
            }
        );
    }

    #[test]
    fn stat_of_a_zombie_reports_state_z() {
        let line = "7 (cozy) Z 1 7 7 0 -1 4227084 0 0 0 0 9 1 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_stat(line).unwrap().state, 'Z');
    }

    #[test]
    fn malformed_stat_and_statm_are_invalid_data() {
        for line in [
            "",
            "12 (no closing paren S 1",
            "1 (x) S 1 2",
            "1 (x) S 1 1 1 0 -1 0 0 0 0 0 a b",
        ] {
            assert_eq!(
                parse_stat(line).unwrap_err().kind(),
                io::ErrorKind::InvalidData,
                "{line:?}"
            );
        }
        assert_eq!(parse_statm_resident("1000 250 10 1 0 90 0\n").unwrap(), 250);
        assert_eq!(
            parse_statm_resident("1000").unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn a_pid_that_does_not_exist_is_not_found_and_not_alive() {
        // Far above the kernel's largest possible pid_max (2^22).
        let pid = u32::MAX;
        assert_eq!(sample(pid).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(!alive(pid));
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(std::process::id()));
    }

    #[test]
    fn an_exited_child_not_yet_reaped_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(child.id()) {
            assert!(Instant::now() < deadline, "child never exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Not reaped yet: the entry is still there, as a zombie.
        assert!(std::path::Path::new(&format!("/proc/{}", child.id())).exists());
        child.wait().unwrap();
    }
}
