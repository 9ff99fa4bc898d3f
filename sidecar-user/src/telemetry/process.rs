//! What the sidecar itself costs, read from `/proc/self`: CPU time, memory, file
//! descriptors, threads, and how long ago it was exec'd.
//!
//! Exported under the names every Prometheus client library uses (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, …), so dashboards and alerts written for any other process
//! work on the sidecar and the agent unchanged.
//!
//! Read here rather than with the `prometheus` crate's `process` feature: that collector counts
//! CPU time in whole seconds (tikv/rust-prometheus#451), so `rate()` over a mostly idle sidecar
//! reads 0 with a 1-second spike every few minutes, which is exactly wrong for a cost panel;
//! and it would bring `procfs` and a second `rustix` for three small files.

use std::{
    fs, io,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use prometheus::{
    Counter, Encoder, Gauge, IntGauge, Opts, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// One reading of this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// User + system, all threads.
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    /// The soft `RLIMIT_NOFILE` (`None`: unlimited).
    pub max_fds: Option<u64>,
    /// Time since exec.
    pub age: Duration,
    /// When exec happened, in seconds since the epoch.
    pub start_time_seconds: f64,
    /// Bytes the allocator has handed out and not had back (`None` where it cannot say).
    pub heap_in_use_bytes: Option<u64>,
}

impl Usage {
    pub fn read() -> io::Result<Self> {
        let stat = Stat::parse(&fs::read_to_string("/proc/self/stat")?)?;
        let ticks = clock_ticks();
        let age = stat.age(boot_clock()?, ticks);
        Ok(Self {
            cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
            resident_memory_bytes: stat.rss_pages * page_size(),
            virtual_memory_bytes: stat.vsize,
            threads: stat.threads,
            // The directory's own descriptor, open while it is read, is not counted.
            open_fds: (fs::read_dir("/proc/self/fd")?.count() as u64).saturating_sub(1),
            max_fds: max_fds(),
            age,
            start_time_seconds: start_time_seconds(age),
            heap_in_use_bytes: heap_in_use(),
        })
    }
}

/// Wall-clock time minus `age`, taken once: read again at each scrape it would wobble by the
/// microseconds between the two clock reads (and with NTP slewing the wall clock), and a
/// start time that moves looks like a restart.
fn start_time_seconds(age: Duration) -> f64 {
    static START: OnceLock<f64> = OnceLock::new();
    *START.get_or_init(|| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        now.saturating_sub(age).as_secs_f64()
    })
}

/// Time since this process was exec'd (`None` if `/proc` cannot say).
pub fn since_exec() -> Option<Duration> {
    let stat = Stat::parse(&fs::read_to_string("/proc/self/stat").ok()?).ok()?;
    Some(stat.age(boot_clock().ok()?, clock_ticks()))
}

/// The fields of `/proc/self/stat` used here (proc(5) numbers them from 1).
#[derive(Debug, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    threads: u64,
    /// Clock ticks after boot (the boot-time clock, so suspend counts, as in `boot_clock`).
    start: u64,
    vsize: u64,
    rss_pages: u64,
}

impl Stat {
    fn parse(text: &str) -> io::Result<Self> {
        // Field 2 is the command name in parentheses, which may itself hold spaces and
        // parentheses: the fields that follow start after the last ')'.
        let rest = text
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| invalid("no command name"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state).
        let field = |n: usize| -> io::Result<u64> {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| invalid(&format!("field {n} missing or not a number")))
        };
        Ok(Self {
            utime: field(14)?,
            stime: field(15)?,
            threads: field(20)?,
            start: field(22)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }

    /// Time from exec to `boot_clock` (the start is in whole ticks, rounded down, so this is
    /// never short, and over by at most one tick).
    fn age(&self, boot_clock: Duration, ticks_per_second: f64) -> Duration {
        boot_clock.saturating_sub(Duration::from_secs_f64(
            self.start as f64 / ticks_per_second,
        ))
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("/proc/self/stat: {what}"),
    )
}

/// `CLOCK_BOOTTIME`: the clock `/proc/<pid>/stat` counts start times on.
fn boot_clock() -> io::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// glibc's count of allocated bytes, in its arenas and in chunks it mmapped on its own.
///
/// RSS cannot tell a leak from memory the allocator keeps for reuse: glibc holds what a burst
/// freed, spread over per-thread arenas, and gives some of it back at times of its choosing,
/// so the RSS after identical bursts wanders by tens of MiB. This count only moves when
/// something is allocated or freed. `mallinfo2` walks every arena under its lock: cheap at
/// scrape rate.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> Option<u64> {
    // SAFETY: mallinfo2 has no preconditions and returns a plain struct.
    let info = unsafe { libc::mallinfo2() };
    // Nothing at all: another allocator serves malloc (AddressSanitizer's, jemalloc) and
    // glibc's counts say nothing about this process.
    let used = (info.uordblks + info.hblkhd) as u64;
    (used > 0).then_some(used)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> Option<u64> {
    None
}

/// How often [`return_freed_memory`] looks.
const TRIM_EVERY: Duration = Duration::from_secs(5);
/// Resident memory beyond the heap in use that is worth giving back.
const TRIM_SLACK: u64 = 32 << 20;

/// Gives memory that a burst of connections freed back to the kernel, for as long as the
/// runtime runs.
///
/// glibc keeps freed chunks for reuse in per-thread arenas and trims only the top of each
/// heap, so after 10,000 connections open and close the sidecar stays at ~250 MiB resident
/// with ~40 MiB in use: enough to meet a pod's memory limit on the next burst. Every few
/// seconds, when resident memory exceeds the heap in use by more than [`TRIM_SLACK`],
/// `malloc_trim` returns the free pages of every arena (`madvise(MADV_DONTNEED)`); the
/// addresses stay mapped, so the next burst only faults the pages back in.
pub async fn return_freed_memory() {
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        let Ok(usage) = Usage::read() else { continue };
        let Some(heap) = usage.heap_in_use_bytes else {
            return;
        };
        if usage.resident_memory_bytes > heap + TRIM_SLACK {
            // It walks every arena under its lock: not on a worker thread.
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; 0 keeps no extra padding at the top.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

fn max_fds() -> Option<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0;
    (ok && rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur)
}

/// The standard `process_*` families, read afresh at every scrape. Register it in a
/// [`prometheus::Registry`]; [`render`] serves it where there is none (the agent).
pub struct ProcessCollector {
    descs: Vec<Desc>,
}

/// One scrape's worth of metrics, built from one [`Usage`].
struct Families {
    cpu: Counter,
    resident: IntGauge,
    virtual_memory: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    start_time: Gauge,
    threads: IntGauge,
    heap: IntGauge,
}

impl Families {
    fn new() -> Self {
        let o = Opts::new;
        let e = "static metric definition";
        Self {
            cpu: Counter::with_opts(o(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            ))
            .expect(e),
            resident: IntGauge::with_opts(o(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            ))
            .expect(e),
            virtual_memory: IntGauge::with_opts(o(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            ))
            .expect(e),
            open_fds: IntGauge::with_opts(o(
                "process_open_fds",
                "Number of open file descriptors.",
            ))
            .expect(e),
            max_fds: IntGauge::with_opts(o(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            ))
            .expect(e),
            start_time: Gauge::with_opts(o(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            ))
            .expect(e),
            threads: IntGauge::with_opts(o(
                "process_threads",
                "Number of OS threads in the process.",
            ))
            .expect(e),
            heap: IntGauge::with_opts(o(
                "sidecar_heap_in_use_bytes",
                "Bytes allocated on the heap and not yet freed (unlike resident memory, \
                 excludes what the allocator keeps for reuse).",
            ))
            .expect(e),
        }
    }

    fn collectors(&self) -> [&dyn Collector; 8] {
        [
            &self.cpu,
            &self.resident,
            &self.virtual_memory,
            &self.open_fds,
            &self.max_fds,
            &self.start_time,
            &self.threads,
            &self.heap,
        ]
    }
}

impl ProcessCollector {
    pub fn new() -> Self {
        let descs = Families::new()
            .collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Self { descs }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    /// Nothing if `/proc/self` cannot be read: a missing family is honest, a zero is not.
    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(u) = Usage::read() else {
            return Vec::new();
        };
        let f = Families::new();
        f.cpu.inc_by(u.cpu_seconds);
        f.resident.set(gauge(u.resident_memory_bytes));
        f.virtual_memory.set(gauge(u.virtual_memory_bytes));
        f.open_fds.set(gauge(u.open_fds));
        f.start_time.set(u.start_time_seconds);
        f.threads.set(gauge(u.threads));
        if let Some(max) = u.max_fds {
            f.max_fds.set(gauge(max));
        }
        if let Some(heap) = u.heap_in_use_bytes {
            f.heap.set(gauge(heap));
        }
        f.collectors()
            .iter()
            .flat_map(|c| c.collect())
            .filter(|m| match m.name() {
                "process_max_fds" => u.max_fds.is_some(),
                "sidecar_heap_in_use_bytes" => u.heap_in_use_bytes.is_some(),
                _ => true,
            })
            .collect()
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The `process_*` families alone, in the Prometheus text format: for an endpoint that
/// writes its other metrics by hand.
pub fn render() -> String {
    let mut out = Vec::new();
    // Encoding well-formed families into a Vec cannot fail.
    let _ = TextEncoder::new().encode(&ProcessCollector::new().collect(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line (from a process named `a) b (c`, which proc(5) prints as is).
    const STAT: &str = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                        250 75 0 0 20 0 9 0 123456 567890123 3210 18446744073709551615 \
                        1 1 0 0 0 0 0 4096 17987 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        assert_eq!(
            Stat::parse(STAT).unwrap(),
            Stat {
                utime: 250,
                stime: 75,
                threads: 9,
                start: 123456,
                vsize: 567890123,
                rss_pages: 3210,
            }
        );
        assert!(Stat::parse("4242 (truncated) S 1 2").is_err());
        assert!(Stat::parse("no command name").is_err());
    }

    #[test]
    fn age_is_from_the_start_tick_to_now() {
        let stat = Stat::parse(STAT).unwrap();
        // Started 1234.56 s after boot at 100 ticks/s; now 1240 s after boot.
        let age = stat.age(Duration::from_secs(1240), 100.0);
        assert!((age.as_secs_f64() - 5.44).abs() < 1e-6, "{age:?}");
        assert_eq!(stat.age(Duration::from_secs(1), 100.0), Duration::ZERO);
    }

    #[test]
    fn this_process_reads_as_a_live_process() {
        let u = Usage::read().unwrap();
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let threads: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(u.threads >= 1 && u.threads <= threads + 64, "{u:?}");
        assert!(u.resident_memory_bytes > 1 << 20, "{u:?}");
        assert!(u.virtual_memory_bytes >= u.resident_memory_bytes, "{u:?}");
        // stdin, stdout and stderr at least.
        assert!(u.open_fds >= 3, "{u:?}");
        assert!(u.max_fds.is_none_or(|m| m >= u.open_fds), "{u:?}");
        assert!(
            u.age > Duration::ZERO && u.age < Duration::from_secs(3600),
            "{u:?}"
        );
        let start = u.start_time_seconds;
        assert_eq!(Usage::read().unwrap().start_time_seconds, start, "stable");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(start > now - 3600.0 && start < now, "{start} vs {now}");
    }

    #[test]
    fn renders_every_standard_family_once() {
        let text = render();
        for name in [
            "process_cpu_seconds_total counter",
            "process_resident_memory_bytes gauge",
            "process_virtual_memory_bytes gauge",
            "process_open_fds gauge",
            "process_start_time_seconds gauge",
            "process_threads gauge",
        ] {
            let line = format!("# TYPE {name}");
            assert_eq!(text.matches(&line).count(), 1, "{line}:\n{text}");
        }
        // Only where glibc's allocator serves malloc (not under AddressSanitizer's).
        let heap = text
            .matches("# TYPE sidecar_heap_in_use_bytes gauge")
            .count();
        assert_eq!(heap, usize::from(heap_in_use().is_some()), "{text}");
    }

    #[test]
    fn heap_in_use_follows_an_allocation_and_its_free() {
        let Some(before) = heap_in_use() else {
            // Another allocator serves malloc (`xtask sanitize` runs these tests under
            // AddressSanitizer's): then there is no reading, and none is exported.
            assert!(render().contains("process_threads"));
            assert!(!render().contains("sidecar_heap_in_use_bytes"));
            return;
        };
        // Small chunks, so they come from an arena, not a chunk of their own.
        let held: Vec<Vec<u8>> = (0..8192).map(|_| vec![1u8; 1024]).collect();
        let during = heap_in_use().unwrap();
        drop(held);
        let after = heap_in_use().unwrap();
        // Other test threads allocate and free too: 8 MiB against half of it as room.
        assert!(during >= before + (4 << 20), "{before} → {during}");
        assert!(after + (4 << 20) <= during, "{during} → {after}");
    }
}
