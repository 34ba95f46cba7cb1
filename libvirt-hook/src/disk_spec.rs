//! Turning a Tandem volume into a libvirt `<disk>` element and the matching virt-install
//! `--disk` argument.
//!
//! The disk is `type='network'` with an NBD source on Tandem's unix socket; the export name
//! is the volume name, and the socket path is the same on every host, so the element is
//! valid on all hosts holding a replica. The driver is raw with `cache='none'` (writes go
//! straight to Tandem, which acknowledges them only when replicated) and `discard='unmap'`
//! (the guest's TRIM reaches the thin pool). `io=` is left out: it configures QEMU's file
//! AIO and means nothing for an NBD client. `<reconnect delay='N'/>` (QEMU retries a lost
//! NBD connection for N seconds, e.g. across a tandemd restart) needs libvirt 9.2.0.
//!
//! With `--frontend vhost-user` the disk is `type='vhostuser'` on the volume's own socket
//! `<run_dir>/vhost/<volume>.sock` (also the same on every host), with `queues` set to
//! tandemd's `vhost_max_queues` (QEMU's default, one queue per vCPU, fails when it is
//! larger), and the domain needs shared memfd memory ([`MEMORY_BACKING`]): vhost-user
//! reads the guest's buffers directly. Its `<source>` carries `<reconnect enabled='yes'
//! timeout='N'/>` (libvirt has it for every vhostuser disk; checked with Debian 12's 9.0):
//! QEMU reconnects to the socket every N seconds after tandemd went away, e.g. across a
//! restart, and the guest's disk works again.

use std::fmt::Write as _;
use std::path::PathBuf;

/// The first libvirt with `<reconnect delay>` for NBD disks.
pub const RECONNECT_MIN_VERSION: LibvirtVersion = LibvirtVersion(9, 2, 0);

/// A libvirt version `major.minor.micro`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct LibvirtVersion(pub u32, pub u32, pub u32);

impl std::fmt::Display for LibvirtVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl LibvirtVersion {
    /// Parse `9.0.0`, or the last such word of `libvirtd (libvirt) 9.0.0`.
    pub fn parse(text: &str) -> Option<LibvirtVersion> {
        text.split_whitespace().rev().find_map(|word| {
            let mut parts = word.trim().split('.').map(|p| p.parse::<u32>().ok());
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(Some(a)), Some(Some(b)), third, None) => {
                    Some(LibvirtVersion(a, b, third.flatten().unwrap_or(0)))
                }
                _ => None,
            }
        })
    }

    pub fn supports_nbd_reconnect(self) -> bool {
        self >= RECONNECT_MIN_VERSION
    }
}

/// What a domain with a vhost-user disk must have in its XML.
pub const MEMORY_BACKING: &str =
    "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>";

/// How QEMU reaches the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Frontend {
    /// QEMU's NBD client on `<run_dir>/nbd.sock`.
    Nbd,
    /// vhost-user-blk on `<run_dir>/vhost/<volume>.sock`.
    VhostUser,
}

/// What goes into the `<disk>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskSpec {
    pub volume: String,
    pub frontend: Frontend,
    /// `<run_dir>/nbd.sock`, or `<run_dir>/vhost/<volume>.sock` for vhost-user.
    pub socket: PathBuf,
    /// vhost-user queues (`<driver queues>`); unused for NBD.
    pub queues: u16,
    /// Guest device, e.g. `vda`.
    pub target: String,
    /// `virtio`, `scsi`, `sata`, ...
    pub bus: String,
    /// NBD: `<reconnect delay>` in seconds, when this libvirt supports it. vhost-user:
    /// `<reconnect enabled='yes' timeout>`, the seconds between QEMU's reconnect attempts.
    pub reconnect_delay: Option<u32>,
}

/// Escape text for an XML attribute in single quotes.
fn attr(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

impl DiskSpec {
    /// The `<disk>` element, indented for `<devices>`.
    pub fn to_xml(&self) -> String {
        if self.frontend == Frontend::VhostUser {
            return self.vhost_user_xml();
        }
        let mut xml = String::new();
        let _ = writeln!(xml, "<disk type='network' device='disk'>");
        let _ = writeln!(
            xml,
            "  <driver name='qemu' type='raw' cache='none' discard='unmap'/>"
        );
        let _ = writeln!(
            xml,
            "  <source protocol='nbd' name='{}'>",
            attr(&self.volume)
        );
        let _ = writeln!(
            xml,
            "    <host transport='unix' socket='{}'/>",
            attr(&self.socket.display().to_string())
        );
        if let Some(delay) = self.reconnect_delay {
            let _ = writeln!(xml, "    <reconnect delay='{delay}'/>");
        }
        let _ = writeln!(xml, "  </source>");
        let _ = writeln!(
            xml,
            "  <target dev='{}' bus='{}'/>",
            attr(&self.target),
            attr(&self.bus)
        );
        let _ = writeln!(xml, "</disk>");
        xml
    }

    fn vhost_user_xml(&self) -> String {
        let path = attr(&self.socket.display().to_string());
        let source = match self.reconnect_delay {
            Some(timeout) => format!(
                "<source type='unix' path='{path}'>\n    \
                 <reconnect enabled='yes' timeout='{timeout}'/>\n  \
                 </source>"
            ),
            None => format!("<source type='unix' path='{path}'/>"),
        };
        format!(
            "<disk type='vhostuser' device='disk'>\n  \
             <driver name='qemu' type='raw' queues='{}'/>\n  \
             {source}\n  \
             <target dev='{}' bus='{}'/>\n\
             </disk>\n",
            self.queues,
            attr(&self.target),
            attr(&self.bus)
        )
    }

    /// The value of virt-install's `--disk` producing the same element (virtinst 4.1 has
    /// no sub-option for `<reconnect>`, nor for a vhostuser disk's socket path;
    /// [`DiskSpec::virt_install_xml_edits`] add them).
    pub fn virt_install_disk(&self) -> String {
        if self.frontend == Frontend::VhostUser {
            return format!(
                "type=vhostuser,source.type=unix,driver.name=qemu,driver.type=raw,driver.queues={},target.dev={},target.bus={}",
                self.queues, self.target, self.bus
            );
        }
        format!(
            "source.protocol=nbd,source.name={},source.host.transport=unix,source.host.socket={},driver.name=qemu,driver.type=raw,driver.cache=none,driver.discard=unmap,target.dev={},target.bus={}",
            self.volume,
            self.socket.display(),
            self.target,
            self.bus
        )
    }

    /// virt-install's `--xml` edits completing disk number `index` (1-based): a vhostuser
    /// disk's socket path, and `<reconnect>` when a delay is set.
    pub fn virt_install_xml_edits(&self, index: usize) -> Vec<String> {
        let source = format!("./devices/disk[{index}]/source");
        let mut edits = Vec::new();
        if self.frontend == Frontend::VhostUser {
            edits.push(format!("{source}/@path={}", self.socket.display()));
        }
        if let Some(delay) = self.reconnect_delay {
            match self.frontend {
                Frontend::Nbd => edits.push(format!("{source}/reconnect/@delay={delay}")),
                Frontend::VhostUser => {
                    edits.push(format!("{source}/reconnect/@enabled=yes"));
                    edits.push(format!("{source}/reconnect/@timeout={delay}"));
                }
            }
        }
        edits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain_xml::{parse_domain, tandem_volumes, Endpoints};

    fn spec(reconnect_delay: Option<u32>) -> DiskSpec {
        DiskSpec {
            volume: "vm-100-disk-0".into(),
            frontend: Frontend::Nbd,
            queues: 4,
            socket: "/run/tandem/nbd.sock".into(),
            target: "vda".into(),
            bus: "virtio".into(),
            reconnect_delay,
        }
    }

    #[test]
    fn disk_element_is_what_libvirt_expects() {
        assert_eq!(
            spec(None).to_xml(),
            "<disk type='network' device='disk'>
  <driver name='qemu' type='raw' cache='none' discard='unmap'/>
  <source protocol='nbd' name='vm-100-disk-0'>
    <host transport='unix' socket='/run/tandem/nbd.sock'/>
  </source>
  <target dev='vda' bus='virtio'/>
</disk>
"
        );
        assert!(spec(Some(5))
            .to_xml()
            .contains("    <reconnect delay='5'/>\n  </source>"));
    }

    #[test]
    fn generated_disk_is_recognised_as_tandems() {
        let mut s = spec(Some(5));
        s.volume = "odd'&<name>".into();
        let domain = format!("<domain><devices>{}</devices></domain>", s.to_xml());
        let parsed = parse_domain(&domain).unwrap();
        let found = tandem_volumes(&parsed, &Endpoints::in_run_dir("/run/tandem")).unwrap();
        assert_eq!(found[0].volume, "odd'&<name>");
        assert_eq!(found[0].target, "vda");
    }

    fn vhost_spec(reconnect_delay: Option<u32>) -> DiskSpec {
        DiskSpec {
            frontend: Frontend::VhostUser,
            socket: "/run/tandem/vhost/vm-100-disk-0.sock".into(),
            ..spec(reconnect_delay)
        }
    }

    #[test]
    fn vhost_user_disk_is_a_vhostuser_element_on_the_volumes_socket() {
        let s = vhost_spec(Some(5));
        assert_eq!(
            s.to_xml(),
            "<disk type='vhostuser' device='disk'>
  <driver name='qemu' type='raw' queues='4'/>
  <source type='unix' path='/run/tandem/vhost/vm-100-disk-0.sock'>
    <reconnect enabled='yes' timeout='5'/>
  </source>
  <target dev='vda' bus='virtio'/>
</disk>
"
        );
        assert!(vhost_spec(None)
            .to_xml()
            .contains("  <source type='unix' path='/run/tandem/vhost/vm-100-disk-0.sock'/>\n"));
        assert_eq!(
            s.virt_install_disk(),
            "type=vhostuser,source.type=unix,driver.name=qemu,driver.type=raw,driver.queues=4,target.dev=vda,target.bus=virtio"
        );
        assert_eq!(
            s.virt_install_xml_edits(1),
            [
                "./devices/disk[1]/source/@path=/run/tandem/vhost/vm-100-disk-0.sock",
                "./devices/disk[1]/source/reconnect/@enabled=yes",
                "./devices/disk[1]/source/reconnect/@timeout=5"
            ]
        );
        assert_eq!(
            vhost_spec(None).virt_install_xml_edits(2),
            ["./devices/disk[2]/source/@path=/run/tandem/vhost/vm-100-disk-0.sock"]
        );
        let domain = format!("<domain><devices>{}</devices></domain>", s.to_xml());
        let found = tandem_volumes(
            &parse_domain(&domain).unwrap(),
            &Endpoints::in_run_dir("/run/tandem"),
        )
        .unwrap();
        assert_eq!(found[0].volume, "vm-100-disk-0");
    }

    #[test]
    fn virt_install_argument() {
        assert_eq!(
            spec(None).virt_install_disk(),
            "source.protocol=nbd,source.name=vm-100-disk-0,source.host.transport=unix,source.host.socket=/run/tandem/nbd.sock,driver.name=qemu,driver.type=raw,driver.cache=none,driver.discard=unmap,target.dev=vda,target.bus=virtio"
        );
        assert!(spec(None).virt_install_xml_edits(1).is_empty());
        assert_eq!(
            spec(Some(5)).virt_install_xml_edits(2),
            ["./devices/disk[2]/source/reconnect/@delay=5"]
        );
    }

    #[test]
    fn versions() {
        assert_eq!(
            LibvirtVersion::parse("libvirtd (libvirt) 9.0.0\n"),
            Some(LibvirtVersion(9, 0, 0))
        );
        assert_eq!(
            LibvirtVersion::parse("9.2.0"),
            Some(LibvirtVersion(9, 2, 0))
        );
        assert_eq!(
            LibvirtVersion::parse("10.5"),
            Some(LibvirtVersion(10, 5, 0))
        );
        assert_eq!(LibvirtVersion::parse("garbage"), None);
        assert!(!LibvirtVersion(9, 0, 0).supports_nbd_reconnect());
        assert!(LibvirtVersion(9, 2, 0).supports_nbd_reconnect());
        assert!(LibvirtVersion(10, 0, 0).supports_nbd_reconnect());
    }
}
