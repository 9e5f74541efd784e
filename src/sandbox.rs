//! Least privilege for `rampart run` (`gateway.user`): after the privileged part of start the gateway is an
//! unprivileged system user with only the capabilities its config still needs, `PR_SET_NO_NEW_PRIVS`,
//! Landlock limiting file access to the state, config and audit paths, and a seccomp allowlist of the system
//! calls it makes (any other one: SIGSYS, a line on stderr, and the process ends). `docs/security.md`
//! ("Privileges") lists what is kept and why.
//!
//! Order matters, and all of it runs on the main thread before any other thread exists: Landlock (ABI < 8)
//! and capabilities are per thread, so a thread started earlier would stay unconfined.
//! 1. [`Plan::new`] (root): resolves the user, hands the state over to it ([`Plan::hand_over`]);
//! 2. [`Plan::confine_files`]: no-new-privs and the Landlock domain (best effort: a kernel without Landlock
//!    gets a warning);
//! 3. the caller enters egress namespaces (`setns` needs CAP_SYS_ADMIN, which goes in step 4);
//! 4. [`Plan::become_user`]: bounding set, groups, gid, uid, then the kept capabilities;
//! 5. [`install_seccomp`]: the filter on every thread (TSYNC: the egress workers of step 3 too).
//!
//! Must never: run step 4 before 2 (threads of step 3 would escape Landlock) or leave a capability the
//! config does not need. This module is one of the few allowed `unsafe` (the SIGSYS handler and the test
//! hook that makes a forbidden call), each block with a `SAFETY` comment.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid, User};

use crate::config::Config;

/// The drop-privileges plan for one start: who to become, what to keep, which paths stay reachable.
pub struct Plan {
    user: User,
    keep: CapsHashSet,
    /// Full access beneath these (state_dir, the audit store's directory).
    rw: Vec<PathBuf>,
    /// Read (and write, for files) only, no execution.
    ro: Vec<PathBuf>,
    rw_files: Vec<PathBuf>,
}

impl Plan {
    /// Resolves `gateway.user` and works out what the gateway still needs. Must run as root.
    pub fn new(cfg: &Config, name: &str) -> anyhow::Result<Plan> {
        let src = cfg.source.display();
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "gateway.user = {name:?} in {src}: `rampart run` must start as root to become that user \
                 (or remove gateway.user and start it as the user you want)"
            );
        }
        let user = User::from_name(name)
            .with_context(|| format!("gateway.user = {name:?} in {src}: cannot look the user up"))?
            .ok_or_else(|| {
                anyhow!(
                    "gateway.user = {name:?} in {src}: no such user; create it \
                     (`useradd --system --no-create-home --shell /usr/sbin/nologin {name}`) or change the key"
                )
            })?;
        if user.uid.is_root() || user.gid.as_raw() == 0 {
            bail!("gateway.user = {name:?} in {src}: that user has uid or gid 0; name an unprivileged one");
        }
        let g = &cfg.gateway;
        let mut rw = vec![g.state_dir.clone()];
        if let Some(dir) = cfg.audit.path.parent() {
            if !dir.starts_with(&g.state_dir) && !dir.as_os_str().is_empty() {
                rw.push(dir.to_path_buf());
            }
        }
        let mut rw_files = Vec::new();
        if let crate::config::CheckpointSink::File(f) = &cfg.audit.checkpoint_sink {
            rw_files.push(f.clone());
        }
        // The config's own directory holds what the config names (CA files, TLS keys); reloads re-read it.
        let mut ro = vec![cfg
            .source
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()];
        for t in &cfg.tenants {
            if let Some(ca) = &t.http.tls_upstream_ca {
                ro.push(ca.clone());
            }
            if let Some(ns) = &t.egress.netns {
                ro.push(ns.clone());
            }
        }
        if let Some((cert, key)) = &cfg.enroll.tls {
            ro.push(cert.clone());
            ro.push(key.clone());
        }
        if let Some(token) = &cfg.gateway.admin_token {
            ro.push(token.file.clone());
        }
        Ok(Plan {
            user,
            keep: needed_caps(cfg),
            rw,
            ro,
            rw_files,
        })
    }

    pub fn user_name(&self) -> &str {
        &self.user.name
    }

    /// Makes the state the gateway writes its user's: state_dir (all of it), the audit store's directory and
    /// files, the checkpoint file, the gateway key, the admin token file. The config must already be readable by the user (it is
    /// the admin's file: refused with the fix, never changed).
    pub fn hand_over(&self, cfg: &Config) -> anyhow::Result<()> {
        let (uid, gid) = (self.user.uid, self.user.gid);
        let readable = |p: &Path| -> bool {
            p.metadata().is_ok_and(|m| {
                let mode = m.mode();
                mode & 0o004 != 0
                    || (mode & 0o040 != 0 && m.gid() == gid.as_raw())
                    || (mode & 0o400 != 0 && m.uid() == uid.as_raw())
            })
        };
        if !readable(&cfg.source) {
            bail!(
                "{}: gateway.user {:?} cannot read this config file (reloads re-read it); \
                 fix: `chgrp {} {} && chmod 640 {}`",
                cfg.source.display(),
                self.user.name,
                self.user.name,
                cfg.source.display(),
                cfg.source.display()
            );
        }
        chown_tree(&cfg.gateway.state_dir, uid, gid)?;
        for dir in &self.rw[1..] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create audit directory {}", dir.display()))?;
            chown(dir, uid, gid)?;
            let stem = cfg
                .audit
                .path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            for e in std::fs::read_dir(dir)?.flatten() {
                if e.file_name().to_string_lossy().starts_with(&stem) {
                    chown(&e.path(), uid, gid)?;
                }
            }
        }
        for f in &self.rw_files {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(f)
                .with_context(|| format!("cannot create audit.checkpoint_sink {}", f.display()))?;
            drop(file);
            chown(f, uid, gid)?;
        }
        if cfg.gateway.private_key_file.exists() {
            chown(&cfg.gateway.private_key_file, uid, gid)?;
        }
        // The admin token must stay mode 0600 (checked at every load) and a reload re-reads it as the user.
        if let Some(token) = &cfg.gateway.admin_token {
            chown(&token.file, uid, gid)?;
        }
        Ok(())
    }

    /// `PR_SET_NO_NEW_PRIVS` and the Landlock domain of this thread (and every thread and child started from
    /// now on). A kernel without Landlock is logged, not fatal.
    pub fn confine_files(&self) -> anyhow::Result<()> {
        use landlock::{
            Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
            RulesetStatus, ABI,
        };
        nix::sys::prctl::set_no_new_privs().context("cannot set PR_SET_NO_NEW_PRIVS")?;
        let abi = ABI::V5;
        let all = AccessFs::from_all(abi);
        let file = AccessFs::from_file(abi);
        let read = AccessFs::ReadFile | AccessFs::ReadDir;
        let exec = read | AccessFs::Execute;
        let rw_file = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
        let exe = std::env::current_exe().context("cannot find the gateway's own binary")?;
        let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = Vec::new();
        rules.extend(self.rw.iter().map(|p| (p.clone(), all)));
        rules.extend(self.rw_files.iter().map(|p| (p.clone(), rw_file)));
        rules.extend(self.ro.iter().map(|p| (p.clone(), read)));
        // The namespace helper is this binary re-executed (dynamic loader and libraries), mapping its uid and
        // setting its sysctls through /proc, and opening /dev/net/tun.
        rules.push((exe, exec));
        for lib in [
            "/lib",
            "/lib64",
            "/usr/lib",
            "/usr/lib64",
            "/etc/ld.so.cache",
        ] {
            rules.push((PathBuf::from(lib), exec));
        }
        rules.push((
            PathBuf::from("/proc"),
            read | AccessFs::WriteFile | AccessFs::Truncate,
        ));
        rules.push((PathBuf::from("/sys"), read));
        rules.push((PathBuf::from("/dev/null"), rw_file));
        rules.push((PathBuf::from("/dev/urandom"), AccessFs::ReadFile.into()));
        rules.push((PathBuf::from("/dev/net/tun"), rw_file | AccessFs::IoctlDev));
        rules.push((PathBuf::from("/etc/localtime"), AccessFs::ReadFile.into()));

        let mut ruleset = Ruleset::default()
            .handle_access(all)
            .context("landlock ruleset")?
            .create()
            .context("landlock ruleset")?;
        for (path, access) in rules {
            let Ok(meta) = std::fs::metadata(&path) else {
                tracing::debug!(path = %path.display(), "not there; no landlock rule for it");
                continue;
            };
            let access = if meta.is_dir() { access } else { access & file };
            let fd =
                PathFd::new(&path).with_context(|| format!("cannot open {}", path.display()))?;
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .with_context(|| format!("landlock rule for {}", path.display()))?;
        }
        let status = ruleset.restrict_self().context("landlock_restrict_self")?;
        match status.ruleset {
            RulesetStatus::FullyEnforced => {
                tracing::info!("landlock: file access limited to state_dir, the config and the audit paths")
            }
            RulesetStatus::PartiallyEnforced => tracing::warn!(
                "landlock: only partly enforced (older kernel ABI); file access is limited, some rights are not"
            ),
            RulesetStatus::NotEnforced => tracing::warn!(
                "landlock is not available on this kernel: file access is NOT confined (only the user's \
                 permissions and seccomp apply); use a kernel with CONFIG_SECURITY_LANDLOCK and `landlock` in lsm="
            ),
        }
        Ok(())
    }

    /// Becomes the user: bounding set to the kept capabilities, supplementary groups = the user's group,
    /// gid, uid, then only the kept capabilities permitted and effective. Other threads lose every capability
    /// (glibc changes the ids of all threads; only this one keeps its capabilities across the change).
    pub fn become_user(&self) -> anyhow::Result<()> {
        for c in caps::all() {
            if !self.keep.contains(&c) {
                // A capability the running kernel does not know cannot be dropped (EINVAL); it cannot be used either.
                let _ = caps::drop(None, CapSet::Bounding, c);
            }
        }
        let (uid, gid) = (self.user.uid, self.user.gid);
        nix::sys::prctl::set_keepcaps(true).context("PR_SET_KEEPCAPS")?;
        nix::unistd::setgroups(&[gid]).context("setgroups")?;
        nix::unistd::setresgid(gid, gid, gid).context("setresgid")?;
        nix::unistd::setresuid(uid, uid, uid).context("setresuid")?;
        nix::sys::prctl::set_keepcaps(false).context("PR_SET_KEEPCAPS")?;
        caps::set(None, CapSet::Effective, &self.keep).map_err(|e| anyhow!("capset: {e}"))?;
        caps::set(None, CapSet::Permitted, &self.keep).map_err(|e| anyhow!("capset: {e}"))?;
        caps::clear(None, CapSet::Inheritable).map_err(|e| anyhow!("capset: {e}"))?;
        caps::clear(None, CapSet::Ambient).map_err(|e| anyhow!("capset: {e}"))?;
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            bail!("still able to become root after dropping privileges; refusing to run");
        }
        let mut kept: Vec<String> = self.keep.iter().map(|c| c.to_string()).collect();
        kept.sort();
        tracing::info!(user = %self.user.name, uid = uid.as_raw(), capabilities = ?kept, "dropped privileges");
        Ok(())
    }
}

/// The capabilities the gateway keeps after the drop, from what `cfg` needs (nothing for most configs).
/// - `CAP_NET_BIND_SERVICE`: a listener on a port below 1024 (bound after the drop, and again when the
///   review UI or enrollment listener restarts);
/// - `CAP_NET_RAW`: an egress with `fwmark` (`SO_MARK` on each off-ramp socket; Linux >= 5.17 accepts
///   CAP_NET_RAW for it instead of CAP_NET_ADMIN). `SO_BINDTODEVICE` on a fresh socket needs none (>= 5.7).
pub fn needed_caps(cfg: &Config) -> CapsHashSet {
    let mut keep = CapsHashSet::new();
    let mut ports = vec![cfg.gateway.listen.port(), cfg.gateway.admin_listen.port()];
    ports.extend(cfg.enroll.listen.map(|a| a.port()));
    ports.extend(cfg.ui.listen.map(|a| a.port()));
    if ports.iter().any(|&p| p != 0 && p < 1024) {
        keep.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    if cfg.tenants.iter().any(|t| t.egress.fwmark.is_some()) {
        keep.insert(Capability::CAP_NET_RAW);
    }
    keep
}

fn chown(p: &Path, uid: Uid, gid: Gid) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid.as_raw()), Some(gid.as_raw()))
        .with_context(|| format!("cannot hand {} to the gateway user", p.display()))
}

fn chown_tree(p: &Path, uid: Uid, gid: Gid) -> anyhow::Result<()> {
    chown(p, uid, gid)?;
    let meta = std::fs::symlink_metadata(p)?;
    if meta.is_dir() {
        for e in std::fs::read_dir(p)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// An admin command run as root on the state of a gateway that drops privileges acts as that gateway's user
/// (the owner of `state_dir`), so what it writes there (registry, tokens, accounts, spool, WAL files) stays
/// readable by the gateway.
pub fn act_as_state_owner(cfg: &Config) -> anyhow::Result<()> {
    if cfg.gateway.user.is_none() || !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(&cfg.gateway.state_dir) else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    let (uid, gid) = (Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid()));
    nix::unistd::setgroups(&[gid]).context("setgroups")?;
    nix::unistd::setresgid(gid, gid, gid).context("setresgid")?;
    nix::unistd::setresuid(uid, uid, uid).context("setresuid")?;
    Ok(())
}

/// Installs the SIGSYS reporter and the seccomp filter on every thread of the process.
pub fn install_seccomp() -> anyhow::Result<()> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    install_sigsys_reporter()?;
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| anyhow!("seccomp: {e:?} (this architecture is not supported)"))?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(|e| anyhow!("seccomp filter: {e}"))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| anyhow!("seccomp filter: {e}"))?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| anyhow!("seccomp: {e}"))?;
    tracing::info!(
        allowed = ALLOWED.len(),
        "seccomp: system calls limited to the allowlist; any other ends the gateway"
    );
    Ok(())
}

/// What the gateway calls (data path, tokio, SQLite, rustls, the netns helper's fork/exec and setup), from
/// the code and the suites that run under it (`e2e_privilege`). Not here, among others: ptrace,
/// process_vm_*, mount, pivot_root, chroot, setns, bpf, perf_event_open, keyctl, *_module, kexec_*,
/// reboot, swapon, setuid and friends, capset, personality, userfaultfd, io_uring_*.
const ALLOWED: &[i64] = &[
    // memory, threads, time
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // key material kept out of swap (the SSH inspector's crypto); found by e2e_ssh under the drop
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_munlock,
    libc::SYS_membarrier,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_getrusage,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_prctl,
    libc::SYS_prlimit64,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_capget,
    // signals
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    // files
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_umask,
    libc::SYS_ioctl,
    libc::SYS_pipe2,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_splice,
    // sockets
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    // the namespace helper: fork, its own user+network namespace, re-exec
    libc::SYS_unshare,
    libc::SYS_execve,
    libc::SYS_setsid,
    libc::SYS_setpgid,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_arch_prctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_stat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lstat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_access,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_readlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_mkdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_unlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rename,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rmdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_pipe,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_dup2,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_select,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_create,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_accept,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_fork,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_vfork,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_chmod,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_getdents,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_eventfd,
];

/// Reports a seccomp violation before the process ends: the kernel's audit log may not exist (containers),
/// so the gateway writes the line itself, then dies of SIGSYS so its supervisor sees why.
fn install_sigsys_reporter() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::SigAction(on_sigsys),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: `on_sigsys` only makes async-signal-safe calls (write, signal, sigprocmask, raise, _exit) on
    // stack data; no other SIGSYS handler is replaced that something relies on.
    unsafe { sigaction(Signal::SIGSYS, &action) }.context("cannot install the SIGSYS handler")?;
    Ok(())
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `si_syscall` of siginfo's `_sigsys` member: after si_signo, si_errno, si_code (padded to 16 bytes) and
    // the call address, at byte 24 on every 64-bit Linux ABI.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t (128 bytes) to an SA_SIGINFO handler.
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) }
    };
    let mut buf = [0u8; 192];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"rampart: seccomp violation: system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = i64::from(nr).unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if nr < 0 {
        put(b"-");
    }
    put(&digits[i..]);
    put(b" is not on the gateway's allowlist; stopping the gateway\n");
    // SAFETY: write(2), signal(2), sigprocmask(2), raise(3) and _exit(2) are async-signal-safe; the buffers
    // are on this stack. SIGSYS back to its default action (core) ends every thread of the process.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(libc::SIGSYS);
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Test hook (`test-hooks` builds only): makes a system call outside the allowlist, `personality(0xffffffff)`
/// (a harmless query of the execution domain without the filter).
#[cfg(feature = "test-hooks")]
pub fn debug_forbidden_syscall() -> std::io::Error {
    // SAFETY: personality with 0xffffffff only reads the current persona; no memory is passed.
    let r = unsafe { libc::personality(0xffff_ffff) };
    if r >= 0 {
        std::io::Error::other("personality() returned: no seccomp filter is installed")
    } else {
        std::io::Error::last_os_error()
    }
}
