//! eBPF interception: loads the embedded object, fills the configuration maps, attaches the
//! programs, and pins maps and links under the run's bpffs directory.
//!
//! [`EbpfInterception`] owns all of it; dropping it detaches every program and removes every
//! pin, also when setup fails halfway. Attach order is sk_msg → sockops → connect hooks, so
//! the first redirected connection already finds the splice machinery in place; detach runs
//! in reverse.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
        sk_msg::SkMsgLinkId,
    },
};
use sidecar_common::{
    Counter, OrigDst, ScopedAddr, SockKey, WorkloadConfig, limits, lpm_prefix_len, mapped_octets,
    maps, programs,
};
use thiserror::Error;

use super::{OrigDstError, Redirect};
use crate::telemetry::CounterSource;

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded at compile time so the
/// binary is self-contained.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SIDECAR_EBPF_OBJECT"));

const PROBE_HINT: &str = "run `sidecar probe` to see which kernel feature is missing";

#[derive(Debug, Error)]
pub enum EbpfError {
    #[error(
        "program {name} calls bpf_get_netns_cookie, which this kernel lacks for it (sockops and \
         sk_msg have it from Linux 5.15)"
    )]
    NoNetnsCookie { name: &'static str },
    #[error("cannot load the eBPF object: {0}; {PROBE_HINT}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {0} (was it built from this source tree?)")]
    Missing(&'static str),
    #[error(
        "the kernel rejected program {name}: {summary}; {PROBE_HINT} (SIDECAR_LOG=debug shows the verifier log)"
    )]
    Program { name: &'static str, summary: String },
    #[error("cannot attach {name} to {target}: {source}; {PROBE_HINT}")]
    Attach {
        name: &'static str,
        target: String,
        source: aya::programs::ProgramError,
    },
    #[error("{name} was attached without a BPF link (kernel older than 5.7?): {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot watch the ring {name} for reports: {source}")]
    Watch {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("cannot pin {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error(
        "pin directory {0} already exists: another run uses it, or a crashed run left it \
         (`sidecar cleanup` removes it)"
    )]
    PinDirExists(PathBuf),
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot read this process's network namespace cookie (SO_NETNS_COOKIE needs Linux ≥ 5.14): {source}"
    )]
    Netns { source: std::io::Error },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where and how to attach.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The connect hooks attach here; it must contain the workload and the proxy cgroups.
    pub connect_cgroup: PathBuf,
    /// sockops attaches here: the cgroup v2 root, so it also sees local upstream servers.
    pub sockops_cgroup: PathBuf,
    /// A fresh directory on bpffs for this run's pins.
    pub pin_dir: PathBuf,
    /// The sockmap fast path (off to measure what it contributes).
    pub sockmap: bool,
    /// Turns on aya-log output from the programs (off by default: it costs cycles).
    pub bpf_log: bool,
    /// Strict inbound mode: the app cgroup, where the cgroup_skb ingress program that drops
    /// connection attempts from outside is attached. `None`: permissive (nothing attached).
    pub strict_inbound_cgroup: Option<PathBuf>,
}

/// A cgroup to enter into `WORKLOADS`.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub cgroup_id: u64,
    pub config: WorkloadConfig,
    /// Pass-through connections it may have open to one destination (`DIRECT_CAPS`).
    pub passthrough_cap: Option<u32>,
}

/// A destination CIDR of the workload with this scope.
#[derive(Debug, Clone, Copy)]
pub struct ScopedCidr {
    pub scope: u32,
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Destinations the connect hooks treat specially, per workload scope.
#[derive(Debug, Clone, Copy, Default)]
pub struct Destinations<'a> {
    /// Bypass the proxy (`--exclude-cidrs`).
    pub excluded: &'a [ScopedCidr],
    /// Have sidecars (`--mesh-cidrs`): always through the proxy, never passed through.
    pub meshed: &'a [ScopedCidr],
}

/// Everything one run loaded, attached and pinned.
pub struct EbpfInterception {
    pins: Pins,
    /// Held, not read: it owns the loaded programs and the sk_msg attachment to the
    /// sockhash, which are released when it drops.
    _ebpf: Ebpf,
    lookups: std::sync::Arc<KernelLookups>,
    _log_pump: Option<LogPump>,
    /// Why the sockmap fast path is off although it was asked for (an older kernel).
    fast_path_unavailable: Option<&'static str>,
}

/// Why the fast path is off on kernels without `bpf_get_netns_cookie` in sockops/sk_msg.
pub const NO_NETNS_COOKIE: &str = "this kernel's sockops/sk_msg programs cannot call \
     bpf_get_netns_cookie (Linux < 5.15), so the sockhash keys could not tell network \
     namespaces apart; connects are still redirected";

impl EbpfInterception {
    /// Loads, attaches and pins everything. On a kernel whose sockops and sk_msg programs
    /// cannot call `bpf_get_netns_cookie` (before 5.15), the programs are loaded again
    /// without it and with the sockmap fast path off: a 4-tuple alone is not unique across
    /// network namespaces, and splicing bytes into another namespace's socket would be worse
    /// than taking the TCP path. Connect redirection works the same.
    pub fn attach(
        settings: &Settings,
        workloads: &[Workload],
        destinations: Destinations<'_>,
    ) -> Result<Self, EbpfError> {
        match Self::attach_as(settings, workloads, destinations, true) {
            Err(EbpfError::NoNetnsCookie { name }) => {
                if settings.sockmap {
                    tracing::warn!(
                        "sockmap fast path off: {NO_NETNS_COOKIE} (program {name} was rejected)"
                    );
                }
                let mut done = Self::attach_as(settings, workloads, destinations, false)?;
                done.fast_path_unavailable = settings.sockmap.then_some(NO_NETNS_COOKIE);
                Ok(done)
            }
            other => other,
        }
    }

    /// Why the fast path is off although it was asked for, if it is.
    pub fn fast_path_unavailable(&self) -> Option<&'static str> {
        self.fast_path_unavailable
    }

    fn attach_as(
        settings: &Settings,
        workloads: &[Workload],
        destinations: Destinations<'_>,
        netns_cookies: bool,
    ) -> Result<Self, EbpfError> {
        let mut pins = Pins::create(&settings.pin_dir)?;
        let sockmap = settings.sockmap && netns_cookies;
        let mut ebpf = EbpfLoader::new()
            .override_global("SOCKMAP_ENABLED", &u8::from(sockmap), true)
            .override_global("NETNS_COOKIES", &u8::from(netns_cookies), true)
            // One run's workload may have the whole tables: its connections past them go
            // through the proxy instead of untracked.
            .override_global("TRACKED_QUOTA", &limits::DIRECT_LIVE, true)
            .override_global("DESTINATIONS_QUOTA", &limits::DIRECT_COUNTS, true)
            .override_global(
                aya_log::LEVEL,
                &if settings.bpf_log { 5u8 } else { 0u8 },
                true,
            )
            .load(OBJECT)
            .map_err(EbpfError::Load)?;

        // Maps first: configuration in place and pinned before any program can run.
        for (name, map) in ebpf.maps() {
            // Only the maps we own by name; `.rodata` and friends are internal to the object.
            if name.starts_with('.') {
                continue;
            }
            let path = settings.pin_dir.join(name);
            map.pin(&path).map_err(|source| EbpfError::Pin {
                path: path.clone(),
                source,
            })?;
            pins.files.push(path);
        }
        fill_workloads(&mut ebpf, workloads)?;
        fill_cidrs(&mut ebpf, maps::EXCLUDED_CIDRS, destinations.excluded)?;
        fill_cidrs(&mut ebpf, maps::MESH_CIDRS, destinations.meshed)?;
        let logger = if settings.bpf_log {
            aya_log::EbpfLogger::init(&mut ebpf)
                .inspect_err(|e| tracing::warn!("eBPF logging unavailable: {e}"))
                .ok()
        } else {
            None
        };

        attach_sk_msg(&mut ebpf)?;
        let root_path = &settings.sockops_cgroup;
        let root = open_cgroup(root_path)?;
        let name = programs::SOCKOPS;
        pins.pin_link(
            name,
            attach_to_cgroup::<SockOps>(&mut ebpf, name, &root, root_path)?,
        )?;

        let path = &settings.connect_cgroup;
        let cgroup = open_cgroup(path)?;
        for name in [programs::CONNECT4, programs::CONNECT6] {
            let link = attach_to_cgroup::<CgroupSockAddr>(&mut ebpf, name, &cgroup, path)?;
            pins.pin_link(name, link)?;
        }
        // Where the connect hooks are: a socket released with its pass-through note still
        // pending gives its quota place back.
        let name = programs::SOCK_RELEASE;
        pins.pin_link(
            name,
            attach_to_cgroup::<CgroupSock>(&mut ebpf, name, &cgroup, path)?,
        )?;
        if let Some(path) = &settings.strict_inbound_cgroup {
            let name = programs::STRICT_INBOUND;
            let app = open_cgroup(path)?;
            pins.pin_link(
                name,
                attach_to_cgroup::<CgroupSkb>(&mut ebpf, name, &app, path)?,
            )?;
        }

        let lookups = std::sync::Arc::new(KernelLookups::open(&settings.pin_dir, netns_cookies)?);
        Ok(Self {
            pins,
            _ebpf: ebpf,
            lookups,
            _log_pump: logger.map(LogPump::start),
            fast_path_unavailable: None,
        })
    }

    /// The read side the proxy uses (original destinations, splice state, counters).
    pub fn lookups(&self) -> std::sync::Arc<KernelLookups> {
        self.lookups.clone()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// Detaches and unpins everything now, reporting what could not be removed.
    pub fn detach(mut self) -> Vec<String> {
        self.pins.remove_all()
    }
}

/// Loads (verifies) a program of the object and returns it typed.
pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    T: 'a + Loadable,
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog: &mut T = ebpf
        .program_mut(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(|source| program_error(name, source))?;
    prog.load_once()
        .map_err(|source| program_error(name, source))?;
    Ok(prog)
}

/// One line for the user; the verifier's full log goes to the debug log.
fn program_error(name: &'static str, source: aya::programs::ProgramError) -> EbpfError {
    let full = source.to_string();
    tracing::debug!(program = name, "{full}");
    if full.contains("unknown func bpf_get_netns_cookie") {
        return EbpfError::NoNetnsCookie { name };
    }
    let summary = full.lines().next().unwrap_or_default();
    let summary = summary
        .split(". Verifier output")
        .next()
        .unwrap_or(summary)
        .to_string();
    EbpfError::Program { name, summary }
}

/// The program types we load, behind one `load` that is a no-op when already loaded.
pub trait Loadable {
    fn load_once(&mut self) -> Result<(), aya::programs::ProgramError>;
}

macro_rules! loadable {
    ($($t:ty),*) => {$(
        impl Loadable for $t {
            fn load_once(&mut self) -> Result<(), aya::programs::ProgramError> {
                match self.fd() {
                    Ok(_) => Ok(()),
                    Err(_) => self.load(),
                }
            }
        }
    )*};
}
loadable!(
    CgroupSockAddr,
    SockOps,
    SkMsg,
    CgroupSkb,
    CgroupSockopt,
    CgroupSock
);

/// A program type the sidecar attaches to a cgroup with a link (aya gives each type its own
/// `attach`; `cgroup_skb` is only ever attached for ingress here).
pub trait CgroupProgram: Loadable {
    /// Attaches to `cgroup` (found at `path`, for the error) and takes the link out of aya's
    /// hands, ready to pin.
    fn attach_link(
        &mut self,
        name: &'static str,
        cgroup: &fs::File,
        path: &Path,
    ) -> Result<FdLink, EbpfError>;
}

macro_rules! cgroup_program {
    ($($t:ty => |$prog:ident, $cgroup:ident| $attach:expr),* $(,)?) => {$(
        impl CgroupProgram for $t {
            fn attach_link(
                &mut self,
                name: &'static str,
                $cgroup: &fs::File,
                path: &Path,
            ) -> Result<FdLink, EbpfError> {
                let $prog = self;
                let id = $attach.map_err(|source| attach_error(name, path, source))?;
                let link = $prog
                    .take_link(id)
                    .map_err(|source| attach_error(name, path, source))?;
                fd_link(name, link)
            }
        }
    )*};
}
cgroup_program!(
    CgroupSockAddr => |p, cgroup| p.attach(cgroup, CgroupAttachMode::Single),
    CgroupSock => |p, cgroup| p.attach(cgroup, CgroupAttachMode::Single),
    SockOps => |p, cgroup| p.attach(cgroup, CgroupAttachMode::Single),
    CgroupSkb => |p, cgroup| p.attach(cgroup, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single),
);

/// Loads (verifies) program `name` of type `P` and attaches it to `cgroup` (at `path`): its
/// link, ready to pin.
pub(crate) fn attach_to_cgroup<P>(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    path: &Path,
) -> Result<FdLink, EbpfError>
where
    P: CgroupProgram,
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    program::<P>(ebpf, name)?.attach_link(name, cgroup, path)
}

pub(crate) fn attach_error(
    name: &'static str,
    target: &Path,
    source: aya::programs::ProgramError,
) -> EbpfError {
    EbpfError::Attach {
        name,
        target: target.display().to_string(),
        source,
    }
}

/// A cgroup attachment as a pinnable BPF link (kernels ≥ 5.7 attach with links).
pub(crate) fn fd_link<L>(name: &'static str, link: L) -> Result<FdLink, EbpfError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|source| EbpfError::Link { name, source })
}

pub(crate) fn open_cgroup(path: &Path) -> Result<fs::File, EbpfError> {
    fs::File::open(path).map_err(|source| EbpfError::Cgroup {
        path: path.into(),
        source,
    })
}

/// Attaches sk_msg to the sockhash; the returned link stays with `ebpf` (detached when it
/// drops) unless the caller takes it, as the node agent does.
pub(crate) fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<SkMsgLinkId, EbpfError> {
    let map_error = |source| EbpfError::Map {
        name: maps::SOCKETS,
        source,
    };
    // A duplicate of the map's fd: the map itself stays in the object, because the sockops
    // program is relocated against it when it loads.
    let sockets = ebpf
        .map(maps::SOCKETS)
        .ok_or(EbpfError::Missing(maps::SOCKETS))?;
    let fd = SockHash::<_, SockKey>::try_from(sockets)
        .map_err(map_error)?
        .fd()
        .try_clone()
        .map_err(|e| map_error(aya::maps::MapError::from(e)))?;
    let prog: &mut SkMsg = program(ebpf, programs::SK_MSG)?;
    prog.attach(&fd).map_err(|source| EbpfError::Attach {
        name: programs::SK_MSG,
        target: maps::SOCKETS.into(),
        source,
    })
}

fn fill_workloads(ebpf: &mut Ebpf, workloads: &[Workload]) -> Result<(), EbpfError> {
    // Caps before the workloads they belong to, so no connect can miss its cap.
    fill_hash(
        ebpf,
        maps::DIRECT_CAPS,
        workloads
            .iter()
            .filter_map(|w| Some((w.config.scope, w.passthrough_cap?))),
    )?;
    fill_hash(
        ebpf,
        maps::WORKLOADS,
        workloads.iter().map(|w| (w.cgroup_id, w.config)),
    )
}

/// Inserts `entries` into the object's hash map `name`.
fn fill_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: impl IntoIterator<Item = (K, V)>,
) -> Result<(), EbpfError> {
    let map = ebpf.map_mut(name).ok_or(EbpfError::Missing(name))?;
    let mut map: HashMap<_, K, V> =
        HashMap::try_from(map).map_err(|source| EbpfError::Map { name, source })?;
    for (k, v) in entries {
        map.insert(k, v, 0)
            .map_err(|source| EbpfError::Map { name, source })?;
    }
    Ok(())
}

fn fill_cidrs(ebpf: &mut Ebpf, name: &'static str, cidrs: &[ScopedCidr]) -> Result<(), EbpfError> {
    let map = ebpf.map_mut(name).ok_or(EbpfError::Missing(name))?;
    let mut trie: LpmTrie<_, ScopedAddr, u8> =
        LpmTrie::try_from(map).map_err(|source| EbpfError::Map { name, source })?;
    for c in cidrs {
        let key = Key::new(
            lpm_prefix_len(c.addr.is_ipv4(), c.prefix),
            ScopedAddr::new(c.scope, mapped_octets(c.addr)),
        );
        trie.insert(&key, 1, 0)
            .map_err(|source| EbpfError::Map { name, source })?;
    }
    Ok(())
}

/// The run's pins. Dropping it unpins every link (which detaches the program) and removes
/// every pinned map and the directory.
struct Pins {
    dir: PathBuf,
    links: Vec<PinnedLink>,
    files: Vec<PathBuf>,
}

impl Pins {
    fn create(dir: &Path) -> Result<Self, EbpfError> {
        if dir.exists() {
            return Err(EbpfError::PinDirExists(dir.into()));
        }
        fs::create_dir_all(dir).map_err(|source| EbpfError::PinDir {
            path: dir.into(),
            source,
        })?;
        Ok(Self {
            dir: dir.into(),
            links: Vec::new(),
            files: Vec::new(),
        })
    }

    fn pin_link(&mut self, name: &str, link: FdLink) -> Result<(), EbpfError> {
        let path = self.dir.join(link_pin_name(name));
        let pinned = link
            .pin(&path)
            .map_err(|source| EbpfError::Pin { path, source })?;
        self.links.push(pinned);
        Ok(())
    }

    /// Unpins in reverse order of attachment; returns what failed.
    fn remove_all(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        let mut gone = 0;
        while let Some(link) = self.links.pop() {
            match link.unpin() {
                Ok(_) => {}
                // The pin went away under us (bpffs unmounted, pins deleted by hand): the link
                // was dropped all the same, and closing its last fd detached the program.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => gone += 1,
                Err(e) => failures.push(format!("unpinning a link in {}: {e}", self.dir.display())),
            }
        }
        if gone > 0 {
            tracing::warn!(
                dir = %self.dir.display(),
                "{gone} link pin(s) were already gone (bpffs unmounted or pins removed while \
                 running): their programs were detached by closing the links"
            );
        }
        for file in self.files.drain(..).rev() {
            if let Err(e) = fs::remove_file(&file)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                failures.push(format!("removing {}: {e}", file.display()));
            }
        }
        if let Err(e) = fs::remove_dir(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            failures.push(format!("removing {}: {e}", self.dir.display()));
        }
        failures
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        for failure in self.remove_all() {
            tracing::warn!("{failure}");
        }
    }
}

/// File name of a pinned link: `link-<program>`.
pub fn link_pin_name(program: &str) -> String {
    format!("link-{program}")
}

/// Read access to the maps the proxy and the reports need, opened from the pins so it works
/// the same for a run's own process and for tools inspecting it.
pub struct KernelLookups {
    /// This process's network namespace: keys are namespace-qualified, and the proxy's
    /// sockets all live in its own (0 where the programs run without netns cookies).
    netns: u64,
    orig_dst: HashMap<MapData, SockKey, OrigDst>,
    spliced: HashMap<MapData, SockKey, u32>,
    counters: PerCpuArray<MapData, u64>,
}

impl KernelLookups {
    /// `netns_cookies`: whether the programs put the netns cookie in their keys (see
    /// [`EbpfInterception::attach`]); without, the keys carry 0.
    pub fn open(pin_dir: &Path, netns_cookies: bool) -> Result<Self, EbpfError> {
        Ok(Self {
            netns: if netns_cookies {
                own_netns_cookie().map_err(|source| EbpfError::Netns { source })?
            } else {
                0
            },
            orig_dst: open_pinned(pin_dir, maps::ORIG_DST)?,
            spliced: open_pinned(pin_dir, maps::SPLICED)?,
            counters: open_pinned(pin_dir, maps::COUNTERS)?,
        })
    }
}

impl CounterSource for KernelLookups {
    /// Sum over CPUs of every counter, by name.
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        sum_counters(&self.counters)
    }
}

/// The map pinned as `dir/name`, typed.
pub(crate) fn open_pinned<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T, EbpfError> {
    let data =
        MapData::from_pin(dir.join(name)).map_err(|source| EbpfError::Map { name, source })?;
    let map =
        aya::maps::Map::from_map_data(data).map_err(|source| EbpfError::Map { name, source })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// Sum over CPUs of every counter in a `COUNTERS` map, by name (an unreadable slot as 0).
pub(crate) fn sum_counters(counters: &PerCpuArray<MapData, u64>) -> BTreeMap<&'static str, u64> {
    Counter::ALL
        .iter()
        .map(|(c, name)| {
            let total = counters
                .get(&(*c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (*name, total)
        })
        .collect()
}

impl Redirect for KernelLookups {
    fn original_destination(
        &self,
        _socket: std::os::fd::BorrowedFd<'_>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<SocketAddr, OrigDstError> {
        // Published by sockops under the app socket's own 4-tuple: (client, proxy listener).
        match self
            .orig_dst
            .get(&SockKey::from_addrs(self.netns, client, local), 0)
        {
            Ok(dst) => Ok(dst.to_socket_addr()),
            Err(aya::maps::MapError::KeyNotFound) => Err(OrigDstError::Unknown { client }),
            Err(e) => Err(OrigDstError::Lookup {
                client,
                reason: e.to_string(),
            }),
        }
    }

    fn is_spliced(
        &self,
        _socket: std::os::fd::BorrowedFd<'_>,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> bool {
        self.spliced
            .get(&SockKey::from_addrs(self.netns, local, peer), 0)
            .is_ok()
    }
}

/// The cookie of the network namespace this process runs in.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    netns_cookie(std::os::fd::AsFd::as_fd(&socket))
}

/// `SO_NETNS_COOKIE` of a socket.
pub fn netns_cookie(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a u64-sized out buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads the programs' aya-log ring buffer into the `log` facade (and so into `tracing`)
/// every 100 ms, on its own thread, until dropped.
struct LogPump {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogPump {
    fn start(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bpf-log".into())
            .spawn(move || {
                while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    logger.flush();
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                logger.flush();
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
