//! Why `/dev/kvm` cannot be used, told precisely: no device (ENOENT), no permission to open
//! it (EACCES on open: name the group to join), or a security module refusing guest_memfd
//! (EACCES from `KVM_CREATE_GUEST_MEMFD` although the device opened, as SELinux does).
//!
//! `GMEM_KVM_DEV` names another device path for every part of gmem, this diagnosis included
//! (`gmem::host::kvm_device`; `GMEM_KVM_DEV=/nonexistent` is a host without KVM).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use gmem::uapi::GUEST_MEMFD_FLAG_MMAP;
use gmem::{Errno, KernelBackend, PAGE_SIZE};

const EACCES: Errno = Errno(libc::EACCES);

pub use gmem::host::kvm_device;

/// Which step refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// open(2) of the device.
    Open,
    /// `KVM_CREATE_VM`.
    CreateVm,
    /// `KVM_CREATE_GUEST_MEMFD`.
    CreateGuestMemfd,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Open => "open",
            Step::CreateVm => "KVM_CREATE_VM",
            Step::CreateGuestMemfd => "KVM_CREATE_GUEST_MEMFD",
        }
    }
}

/// Owner, group and mode of the device, for the permission message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOwner {
    /// Owning user name (or number).
    pub user: String,
    /// Owning group name (or number).
    pub group: String,
    /// Permission bits.
    pub mode: u32,
}

/// Why KVM cannot be used here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvmProblem {
    /// No device.
    #[error(
        "{} does not exist (ENOENT): KVM is not loaded or not offered on this host \
         (modprobe kvm_intel or kvm_amd; in a VM, nested virtualization must be on); the \
         emulated backend works without it",
        path.display()
    )]
    Missing {
        /// The device path.
        path: PathBuf,
    },
    /// The device exists but this user may not open it.
    #[error("{} exists but cannot be opened (EACCES): {}", path.display(), permission_hint(owner.as_ref()))]
    NoPermission {
        /// The device path.
        path: PathBuf,
        /// Its owner, group and mode, if readable.
        owner: Option<DeviceOwner>,
    },
    /// The device opened but a security module refused a KVM call.
    #[error(
        "{} opened but {} was refused with EACCES: a Linux security module (SELinux, \
         AppArmor) denies it to this process, not the file mode; look for the denial in the \
         audit log (ausearch -m avc -ts recent) and allow it for this domain",
        path.display(),
        step.name()
    )]
    SecurityModule {
        /// The device path.
        path: PathBuf,
        /// The refused call.
        step: Step,
    },
    /// Another error.
    #[error("{}: {} failed: {errno}", path.display(), step.name())]
    Other {
        /// The device path.
        path: PathBuf,
        /// The failed step.
        step: Step,
        /// Its errno.
        errno: Errno,
    },
}

impl KvmProblem {
    /// A short name for JSON: `missing`, `no_permission`, `security_module`, `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            KvmProblem::Missing { .. } => "missing",
            KvmProblem::NoPermission { .. } => "no_permission",
            KvmProblem::SecurityModule { .. } => "security_module",
            KvmProblem::Other { .. } => "other",
        }
    }
}

fn permission_hint(owner: Option<&DeviceOwner>) -> String {
    match owner {
        Some(o) if o.mode & 0o060 == 0o060 && o.group != "root" => format!(
            "it is {}:{} mode {:04o}, so members of group {g} may use it: add yourself with \
             `sudo usermod -aG {g} $USER` and log in again",
            o.user,
            o.group,
            o.mode,
            g = o.group
        ),
        Some(o) => format!(
            "it is {}:{} mode {:04o}, which lets no other user in; distributions normally make \
             it root:kvm 0660 (a udev rule), and then `sudo usermod -aG kvm $USER` (and a new \
             login) gives access",
            o.user, o.group, o.mode
        ),
        None => "join the group that owns it, usually kvm: `sudo usermod -aG kvm $USER`, \
                 then log in again"
            .to_string(),
    }
}

/// The problem `errno` at `step` means (EACCES on open is the file mode, EACCES after the
/// device opened is a security module).
pub fn classify(path: &Path, step: Step, errno: Errno, owner: Option<DeviceOwner>) -> KvmProblem {
    let path = path.to_path_buf();
    match (step, errno) {
        (Step::Open, Errno::ENOENT) => KvmProblem::Missing { path },
        (Step::Open, EACCES | Errno::EPERM) => KvmProblem::NoPermission { path, owner },
        (_, EACCES | Errno::EPERM) => KvmProblem::SecurityModule { path, step },
        (step, errno) => KvmProblem::Other { path, step, errno },
    }
}

/// Name of user or group `id` from `file` (`/etc/passwd`, `/etc/group`), else the number.
fn id_name(file: &str, id: u32) -> String {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)? == id.to_string()).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| id.to_string())
}

fn owner(path: &Path) -> Option<DeviceOwner> {
    let m = std::fs::metadata(path).ok()?;
    Some(DeviceOwner {
        user: id_name("/etc/passwd", m.uid()),
        group: id_name("/etc/group", m.gid()),
        mode: m.mode() & 0o7777,
    })
}

/// Checks that KVM at `path` can be used for guest_memfd: opens it, creates a VM of type 0
/// and a one-page guest_memfd. `Ok` also when guest_memfd is merely unsupported (that is
/// no access problem; `gmem probe` says what the kernel lacks).
pub fn check(path: &Path) -> Result<(), KvmProblem> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        let errno = Errno(e.raw_os_error().unwrap_or(libc::EIO));
        return Err(classify(path, Step::Open, errno, owner(path)));
    }
    let backend = KernelBackend::open(path, 0)
        .map_err(|errno| classify(path, Step::CreateVm, errno, None))?;
    match backend.create_guest_memfd(PAGE_SIZE, GUEST_MEMFD_FLAG_MMAP) {
        Err(errno @ (EACCES | Errno::EPERM)) => {
            Err(classify(path, Step::CreateGuestMemfd, errno, None))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/dev/kvm")
    }

    #[test]
    fn enoent_on_open_is_no_device() {
        let e = classify(p(), Step::Open, Errno::ENOENT, None);
        assert_eq!(e.kind(), "missing");
        assert!(
            e.to_string().contains("/dev/kvm does not exist (ENOENT)"),
            "{e}"
        );
    }

    #[test]
    fn eacces_on_open_names_the_group_to_join() {
        let owner = DeviceOwner {
            user: "root".into(),
            group: "kvm".into(),
            mode: 0o660,
        };
        let e = classify(p(), Step::Open, EACCES, Some(owner));
        assert_eq!(e.kind(), "no_permission");
        let s = e.to_string();
        assert!(s.contains("cannot be opened (EACCES)"), "{s}");
        assert!(s.contains("root:kvm mode 0660"), "{s}");
        assert!(s.contains("sudo usermod -aG kvm $USER"), "{s}");
    }

    #[test]
    fn eacces_on_a_root_only_device_says_so_and_names_kvm() {
        let owner = DeviceOwner {
            user: "root".into(),
            group: "root".into(),
            mode: 0o600,
        };
        let s = classify(p(), Step::Open, EACCES, Some(owner)).to_string();
        assert!(s.contains("root:root mode 0600"), "{s}");
        assert!(s.contains("usermod -aG kvm"), "{s}");
    }

    #[test]
    fn eacces_from_create_guest_memfd_is_a_security_module() {
        let e = classify(p(), Step::CreateGuestMemfd, EACCES, None);
        assert_eq!(e.kind(), "security_module");
        let s = e.to_string();
        assert!(
            s.contains("KVM_CREATE_GUEST_MEMFD was refused with EACCES"),
            "{s}"
        );
        assert!(s.contains("SELinux"), "{s}");
    }

    #[test]
    fn other_errors_name_the_step_and_errno() {
        let e = classify(p(), Step::CreateVm, Errno::EINVAL, None);
        assert_eq!(e.kind(), "other");
        assert!(
            e.to_string().contains("KVM_CREATE_VM failed: EINVAL"),
            "{e}"
        );
    }
}
