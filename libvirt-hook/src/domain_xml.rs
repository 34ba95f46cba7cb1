//! Reading a libvirt domain XML (what a hook gets on stdin): the domain's name and UUID and
//! the source of every `<disk>`, then picking out the disks Tandem serves.
//!
//! The reader is streaming (quick-xml) and only looks at libvirt's own, unprefixed elements
//! at their fixed places: `/domain/name`, `/domain/uuid`, `/domain/devices/disk` and that
//! disk's direct `<source>`, `<source>/<host>` and `<target>`. Everything else (metadata
//! of other tools with or without namespaces, comments, `<backingStore>` sources, CD-ROMs,
//! file and block disks) is walked over but never interpreted, so foreign content cannot
//! make a disk look like Tandem's. Entities in attributes and text are resolved. Input that
//! is not well-formed XML, or whose root is not `<domain>`, is a [`DomainXmlError`] that
//! says where it broke.
//!
//! A disk is Tandem's ([`tandem_volumes`]) when it points at one of this node's
//! [`Endpoints`]:
//!
//! * NBD: `type='network'`, its source is `protocol='nbd'` and its single `<host>` is this
//!   node's NBD endpoint: the unix socket `<run_dir>/nbd.sock`, or the TCP listener
//!   `[nbd] tcp_listen` when configured. The volume is the source's `name` (the NBD export
//!   name).
//! * vhost-user-blk: `type='vhostuser'` with `<source type='unix' path='...'/>` where the
//!   path is `<run_dir>/vhost/<volume>.sock`. The volume is the file name without `.sock`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use volume_driver::config::Config;

/// The NBD port when a `<host>` names none (the IANA port).
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Why a domain XML could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    /// Not well-formed XML.
    #[error("domain XML is not well-formed at byte {position}")]
    Malformed {
        position: u64,
        #[source]
        source: quick_xml::Error,
    },
    /// An attribute could not be read (bad quoting, unknown entity).
    #[error("domain XML: bad attribute in <{element}> near byte {position}")]
    Attribute {
        element: String,
        position: u64,
        #[source]
        source: quick_xml::Error,
    },
    /// Well-formed but not a domain.
    #[error("not a libvirt domain XML: {0}")]
    NotADomain(String),
    /// The document ended inside an element.
    #[error("domain XML ends inside <{0}> (truncated?)")]
    Truncated(String),
    /// A disk on Tandem's endpoint that names no volume.
    #[error("disk {target} uses Tandem's NBD endpoint but its <source> has no name='VOLUME'")]
    TandemDiskWithoutVolume { target: String },
}

/// What the hook needs from a domain XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainInfo {
    /// `<name>` (empty when absent).
    pub name: String,
    /// `<uuid>`, when present.
    pub uuid: Option<String>,
    /// Every `<devices>/<disk>`, in document order.
    pub disks: Vec<DiskInfo>,
}

/// One `<disk>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskInfo {
    /// `type=` (`file`, `block`, `network`, `volume`, ...).
    pub disk_type: String,
    /// `device=` (`disk` when absent, as libvirt defaults it).
    pub device: String,
    /// `<target dev=...>`, when present.
    pub target: Option<String>,
    /// `<source>`'s attributes of interest; `None` without a `<source>` (an empty CD-ROM).
    pub source: Option<SourceInfo>,
    /// `<shareable/>`: several domains may use the disk at once (cluster file systems).
    pub shareable: bool,
}

/// A disk's direct `<source>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceInfo {
    /// `type=` (`unix` for a vhostuser disk).
    pub source_type: Option<String>,
    pub protocol: Option<String>,
    /// `name=` (the NBD export name for nbd).
    pub name: Option<String>,
    pub file: Option<String>,
    pub dev: Option<String>,
    /// `path=` (the socket of a vhostuser disk).
    pub path: Option<String>,
    /// The `<host>` children.
    pub hosts: Vec<HostInfo>,
}

/// One `<source>/<host>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostInfo {
    /// `transport=` (`tcp` when absent).
    pub transport: Option<String>,
    pub name: Option<String>,
    pub port: Option<String>,
    pub socket: Option<String>,
}

/// A disk of a domain that Tandem serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TandemDisk {
    /// The volume (NBD export) name, or the name in the vhost-user socket's file name.
    pub volume: String,
    /// The guest device (`vda`), or `?` when the disk names none.
    pub target: String,
    /// Marked `<shareable/>` in the domain.
    pub shareable: bool,
}

/// Where this node serves volumes: the disks pointing here are Tandem's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// `<run_dir>/nbd.sock`.
    pub unix_socket: PathBuf,
    /// `[nbd] tcp_listen`, when configured.
    pub tcp_listen: Option<SocketAddr>,
    /// Addresses by which this node's TCP listener is reached when it listens on the
    /// unspecified address (0.0.0.0 / ::): this node's configured IPs. Loopback always counts.
    pub local_ips: Vec<IpAddr>,
    /// `<run_dir>/vhost`, where each volume's vhost-user-blk socket is.
    pub vhost_dir: PathBuf,
}

impl Endpoints {
    /// The endpoints of a node whose run directory is `run_dir`, NBD on the unix socket
    /// only.
    pub fn in_run_dir(run_dir: impl AsRef<Path>) -> Self {
        let run_dir = run_dir.as_ref();
        Endpoints {
            unix_socket: run_dir.join("nbd.sock"),
            tcp_listen: None,
            local_ips: Vec::new(),
            vhost_dir: run_dir.join("vhost"),
        }
    }

    /// This node's endpoints from its Tandem config.
    pub fn of_node(config: &Config) -> Self {
        let mut local_ips = Vec::new();
        if let Some(me) = config.nodes.iter().find(|n| n.name == config.node) {
            local_ips.push(me.control.ip());
            local_ips.push(me.replication.ip());
        }
        Endpoints {
            unix_socket: config.nbd_socket(),
            tcp_listen: config.nbd.tcp_listen,
            local_ips,
            vhost_dir: config.vhost_dir(),
        }
    }

    /// The volume whose vhost-user-blk socket `path` is, when it is one of this node's.
    pub fn vhost_volume(&self, path: &str) -> Option<String> {
        let path = Path::new(path);
        if path.parent() != Some(self.vhost_dir.as_path()) {
            return None;
        }
        let volume = path.file_name()?.to_str()?.strip_suffix(".sock")?;
        (!volume.is_empty()).then(|| volume.to_string())
    }

    /// Whether an NBD `<host>` points at this node's server.
    pub fn matches(&self, host: &HostInfo) -> bool {
        match host.transport.as_deref().unwrap_or("tcp") {
            "unix" => host
                .socket
                .as_deref()
                .is_some_and(|socket| Path::new(socket) == self.unix_socket),
            "tcp" => {
                let Some(listen) = self.tcp_listen else {
                    return false;
                };
                let port = match host.port.as_deref() {
                    None => NBD_DEFAULT_PORT,
                    Some(p) => match p.trim().parse::<u16>() {
                        Ok(p) => p,
                        Err(_) => return false,
                    },
                };
                if port != listen.port() {
                    return false;
                }
                let Some(name) = host.name.as_deref() else {
                    return false;
                };
                let ip = if name == "localhost" {
                    Some(IpAddr::from([127, 0, 0, 1]))
                } else {
                    name.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .ok()
                };
                match ip {
                    Some(ip) if ip == listen.ip() => true,
                    Some(ip) if listen.ip().is_unspecified() => {
                        ip.is_loopback() || self.local_ips.contains(&ip)
                    }
                    _ => false,
                }
            }
            _ => false,
        }
    }
}

/// The disks of `domain` that this node's Tandem serves, one per volume (a volume attached
/// twice is listed once), in document order.
pub fn tandem_volumes(
    domain: &DomainInfo,
    endpoints: &Endpoints,
) -> Result<Vec<TandemDisk>, DomainXmlError> {
    let mut found: Vec<TandemDisk> = Vec::new();
    for disk in &domain.disks {
        let Some(source) = &disk.source else { continue };
        let target = disk.target.clone().unwrap_or_else(|| "?".to_string());
        let volume = match disk.disk_type.as_str() {
            "network" => match nbd_volume(source, endpoints, &target)? {
                Some(volume) => volume,
                None => continue,
            },
            "vhostuser" if source.source_type.as_deref() == Some("unix") => {
                match source
                    .path
                    .as_deref()
                    .and_then(|p| endpoints.vhost_volume(p))
                {
                    Some(volume) => volume,
                    None => continue,
                }
            }
            _ => continue,
        };
        match found.iter_mut().find(|d| d.volume == volume) {
            Some(existing) => existing.shareable |= disk.shareable,
            None => found.push(TandemDisk {
                volume,
                target,
                shareable: disk.shareable,
            }),
        }
    }
    Ok(found)
}

/// The volume of a `type='network'` disk's source when it is an NBD export of this node.
fn nbd_volume(
    source: &SourceInfo,
    endpoints: &Endpoints,
    target: &str,
) -> Result<Option<String>, DomainXmlError> {
    if source.protocol.as_deref() != Some("nbd") {
        return Ok(None);
    }
    // libvirt allows exactly one host for nbd; anything else is not ours to judge.
    let [host] = source.hosts.as_slice() else {
        return Ok(None);
    };
    if !endpoints.matches(host) {
        return Ok(None);
    }
    match source.name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => Ok(Some(name.to_string())),
        _ => Err(DomainXmlError::TandemDiskWithoutVolume {
            target: target.to_string(),
        }),
    }
}

/// True when the domain has any disk that may be Tandem's (NBD or vhost-user), before the
/// config is needed to tell whose.
pub fn has_candidate_disks(domain: &DomainInfo) -> bool {
    domain.disks.iter().any(|d| {
        d.disk_type == "vhostuser"
            || d.source
                .as_ref()
                .is_some_and(|s| s.protocol.as_deref() == Some("nbd"))
    })
}

/// Parse a domain XML.
pub fn parse_domain(xml: &str) -> Result<DomainInfo, DomainXmlError> {
    let mut reader = Reader::from_str(xml);
    // Text is only read for <name> and <uuid>; surrounding whitespace is never meaningful.
    reader.config_mut().trim_text(true);
    let mut domain = DomainInfo::default();
    let mut seen_root = false;
    // Qualified names of the open elements, root first.
    let mut path: Vec<String> = Vec::new();
    let mut text = String::new();
    loop {
        let position = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|source| DomainXmlError::Malformed {
                position: reader.error_position(),
                source,
            })?;
        match event {
            Event::Start(e) => {
                let name = element_name(&e);
                if path.is_empty() {
                    check_root(&name, &mut seen_root)?;
                }
                path.push(name);
                text.clear();
                let attrs = attributes(&e, position)?;
                on_element(&mut domain, &path, &attrs);
            }
            Event::Empty(e) => {
                let name = element_name(&e);
                if path.is_empty() {
                    check_root(&name, &mut seen_root)?;
                }
                path.push(name);
                let attrs = attributes(&e, position)?;
                on_element(&mut domain, &path, &attrs);
                path.pop();
            }
            Event::End(_) => {
                // quick-xml checks that end names match their start.
                if is_path(&path, &["domain", "name"]) {
                    domain.name = text.trim().to_string();
                } else if is_path(&path, &["domain", "uuid"]) {
                    domain.uuid = Some(text.trim().to_string());
                }
                path.pop();
            }
            Event::Text(t) => {
                if wants_text(&path) {
                    let unescaped = t
                        .unescape()
                        .map_err(|source| DomainXmlError::Malformed { position, source })?;
                    text.push_str(&unescaped);
                } else if path.is_empty() {
                    return Err(DomainXmlError::NotADomain(
                        "text outside the <domain> element".into(),
                    ));
                }
            }
            Event::CData(c) => {
                if wants_text(&path) {
                    text.push_str(&String::from_utf8_lossy(&c.into_inner()));
                }
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if let Some(open) = path.last() {
        return Err(DomainXmlError::Truncated(open.clone()));
    }
    if !seen_root {
        return Err(DomainXmlError::NotADomain("the document is empty".into()));
    }
    Ok(domain)
}

fn element_name(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.name().as_ref()).into_owned()
}

fn check_root(name: &str, seen_root: &mut bool) -> Result<(), DomainXmlError> {
    if *seen_root {
        return Err(DomainXmlError::NotADomain(format!(
            "a second top-level element <{name}> after </domain>"
        )));
    }
    if name != "domain" {
        return Err(DomainXmlError::NotADomain(format!(
            "the root element is <{name}>, expected <domain>"
        )));
    }
    *seen_root = true;
    Ok(())
}

fn is_path(path: &[String], expected: &[&str]) -> bool {
    path.len() == expected.len() && path.iter().zip(expected).all(|(a, b)| a == b)
}

fn wants_text(path: &[String]) -> bool {
    is_path(path, &["domain", "name"]) || is_path(path, &["domain", "uuid"])
}

/// Record what an opening (or self-closing) element at `path` tells about the disks.
/// Every element's attributes are read (and so checked), not only these.
fn on_element(domain: &mut DomainInfo, path: &[String], attrs: &[(String, String)]) {
    const DISK: &[&str] = &["domain", "devices", "disk"];
    const SOURCE: &[&str] = &["domain", "devices", "disk", "source"];
    const HOST: &[&str] = &["domain", "devices", "disk", "source", "host"];
    const TARGET: &[&str] = &["domain", "devices", "disk", "target"];
    const SHAREABLE: &[&str] = &["domain", "devices", "disk", "shareable"];
    if is_path(path, DISK) {
        domain.disks.push(DiskInfo {
            disk_type: attr(attrs, "type").unwrap_or_default(),
            device: attr(attrs, "device").unwrap_or_else(|| "disk".to_string()),
            target: None,
            source: None,
            shareable: false,
        });
        return;
    }
    let Some(disk) = domain.disks.last_mut() else {
        return;
    };
    if is_path(path, SOURCE) {
        disk.source = Some(SourceInfo {
            source_type: attr(attrs, "type"),
            protocol: attr(attrs, "protocol"),
            name: attr(attrs, "name"),
            file: attr(attrs, "file"),
            dev: attr(attrs, "dev"),
            path: attr(attrs, "path"),
            hosts: Vec::new(),
        });
    } else if is_path(path, HOST) {
        if let Some(source) = disk.source.as_mut() {
            source.hosts.push(HostInfo {
                transport: attr(attrs, "transport"),
                name: attr(attrs, "name"),
                port: attr(attrs, "port"),
                socket: attr(attrs, "socket"),
            });
        }
    } else if is_path(path, TARGET) {
        disk.target = attr(attrs, "dev");
    } else if is_path(path, SHAREABLE) {
        disk.shareable = true;
    }
}

fn attributes(e: &BytesStart<'_>, position: u64) -> Result<Vec<(String, String)>, DomainXmlError> {
    let element = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut out = Vec::new();
    for attribute in e.attributes() {
        let attribute = attribute.map_err(|source| DomainXmlError::Attribute {
            element: element.clone(),
            position,
            source: source.into(),
        })?;
        let value = attribute
            .unescape_value()
            .map_err(|source| DomainXmlError::Attribute {
                element: element.clone(),
                position,
                source,
            })?;
        out.push((
            String::from_utf8_lossy(attribute.key.as_ref()).into_owned(),
            value.into_owned(),
        ));
    }
    Ok(out)
}

fn attr(attrs: &[(String, String)], key: &str) -> Option<String> {
    attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn endpoints() -> Endpoints {
        Endpoints::in_run_dir("/run/tandem")
    }

    fn volumes(xml: &str, endpoints: &Endpoints) -> Vec<String> {
        let domain = parse_domain(xml).unwrap();
        tandem_volumes(&domain, endpoints)
            .unwrap()
            .into_iter()
            .map(|d| d.volume)
            .collect()
    }

    #[test]
    fn virt_manager_domain_with_libosinfo_metadata_cdrom_and_mixed_disks() {
        let xml = testdata("virt-manager.xml");
        let domain = parse_domain(&xml).unwrap();
        assert_eq!(domain.name, "web01");
        assert_eq!(
            domain.uuid.as_deref(),
            Some("5b2a6c0e-7f1d-4d8e-9a43-2f0c1b9e7a11")
        );
        assert_eq!(domain.disks.len(), 5, "{:#?}", domain.disks);
        let cdrom = &domain.disks[3];
        assert_eq!(cdrom.device, "cdrom");
        assert_eq!(
            cdrom.source.as_ref().unwrap().file.as_deref(),
            Some("/var/lib/libvirt/images/debian-12.iso")
        );
        let tandem = tandem_volumes(&domain, &endpoints()).unwrap();
        assert_eq!(
            tandem,
            vec![
                TandemDisk {
                    volume: "vm-100-disk-0".into(),
                    target: "vda".into(),
                    shareable: false,
                },
                TandemDisk {
                    volume: "vm-100-disk-1".into(),
                    target: "vdc".into(),
                    shareable: false,
                },
            ]
        );
    }

    #[test]
    fn namespaced_metadata_and_comments_cannot_fake_a_disk() {
        let xml = testdata("namespaces-comments.xml");
        let domain = parse_domain(&xml).unwrap();
        assert_eq!(
            domain.name, "db & cache <1>",
            "entities in text are resolved"
        );
        // The <disk> elements inside <metadata> (prefixed and default-namespaced) and the
        // commented-out disk are not the domain's disks.
        assert_eq!(domain.disks.len(), 2, "{:#?}", domain.disks);
        assert_eq!(
            volumes(&xml, &endpoints()),
            vec!["vm-7-disk-0&data".to_string()],
            "entities in attributes are resolved"
        );
    }

    #[test]
    fn block_file_and_foreign_nbd_disks_are_not_tandems() {
        let xml = testdata("no-tandem-disks.xml");
        let domain = parse_domain(&xml).unwrap();
        assert_eq!(domain.disks.len(), 5);
        assert_eq!(
            domain.disks[0].source.as_ref().unwrap().dev.as_deref(),
            Some("/dev/vg0/vm-5-disk-0")
        );
        assert!(has_candidate_disks(&domain));
        assert!(tandem_volumes(&domain, &endpoints()).unwrap().is_empty());
    }

    #[test]
    fn proxmox_style_and_self_closing_variants() {
        let xml = testdata("proxmox-style.xml");
        assert_eq!(
            volumes(&xml, &endpoints()),
            vec!["vm-101-disk-0".to_string(), "vm-101-disk-1".to_string()],
            "non-self-closing <host></host>, single and double quotes, attribute order, \
             backingStore sources ignored, a volume attached twice listed once"
        );
        let domain = parse_domain(&xml).unwrap();
        let disks = tandem_volumes(&domain, &endpoints()).unwrap();
        assert!(disks[0].shareable, "the second attachment is <shareable/>");
        assert!(!disks[1].shareable);
    }

    #[test]
    fn tcp_hosts_match_only_this_nodes_listener() {
        let xml = testdata("tcp-hosts.xml");
        assert!(volumes(&xml, &endpoints()).is_empty(), "no TCP listener");
        let specific = Endpoints {
            tcp_listen: Some("192.168.1.11:10809".parse().unwrap()),
            ..endpoints()
        };
        assert_eq!(volumes(&xml, &specific), vec!["tcp-default-port"]);
        let any = Endpoints {
            tcp_listen: Some("0.0.0.0:10809".parse().unwrap()),
            local_ips: vec!["192.168.1.11".parse().unwrap()],
            ..endpoints()
        };
        assert_eq!(
            volumes(&xml, &any),
            vec!["tcp-default-port", "tcp-loopback"],
            "other hosts' listeners and other ports are not ours"
        );
    }

    #[test]
    fn socket_paths_compare_as_paths() {
        let xml = r#"<domain><devices><disk type='network'><source protocol='nbd' name='v'>
            <host transport='unix' socket='/run//tandem/nbd.sock'/></source></disk></devices></domain>"#;
        assert_eq!(volumes(xml, &endpoints()), vec!["v"]);
        let elsewhere = Endpoints {
            unix_socket: "/run/tandem/nbd.sock2".into(),
            ..endpoints()
        };
        assert!(volumes(xml, &elsewhere).is_empty());
    }

    #[test]
    fn vhost_user_disks_on_this_nodes_sockets_are_tandems() {
        let xml = testdata("vhost-user.xml");
        let domain = parse_domain(&xml).unwrap();
        assert!(has_candidate_disks(&domain));
        assert_eq!(
            tandem_volumes(&domain, &endpoints()).unwrap(),
            vec![
                TandemDisk {
                    volume: "vm-200-disk-0".into(),
                    target: "vda".into(),
                    shareable: false,
                },
                TandemDisk {
                    volume: "vm-200-disk-1".into(),
                    target: "vdb".into(),
                    shareable: true,
                },
            ],
            "other directories, other file names, non-unix sources and non-vhostuser \
             disks with a path are not ours; a volume on NBD and vhost-user is listed once"
        );
        let elsewhere = Endpoints::in_run_dir("/var/run/tandem");
        assert!(tandem_volumes(&domain, &elsewhere).unwrap().is_empty());
    }

    #[test]
    fn a_vhost_user_socket_names_its_volume_only_in_this_nodes_directory() {
        let e = endpoints();
        let volume = |path: &str| e.vhost_volume(path);
        assert_eq!(volume("/run/tandem/vhost/v1.sock").as_deref(), Some("v1"));
        assert_eq!(volume("/run//tandem/vhost/v1.sock").as_deref(), Some("v1"));
        assert_eq!(volume("/run/tandem/vhost/a.b.sock").as_deref(), Some("a.b"));
        for other in [
            "/run/tandem/vhost/.sock",
            "/run/tandem/vhost/v1",
            "/run/tandem/vhost/sub/v1.sock",
            "/run/tandem/v1.sock",
            "/run/tandem/vhost",
            "run/tandem/vhost/v1.sock",
            "",
        ] {
            assert_eq!(volume(other), None, "{other}");
        }
    }

    #[test]
    fn tandem_disk_without_export_name_is_an_error() {
        let xml = r#"<domain><devices><disk type='network' device='disk'><source protocol='nbd'>
            <host transport='unix' socket='/run/tandem/nbd.sock'/></source><target dev='vdb'/></disk></devices></domain>"#;
        let domain = parse_domain(xml).unwrap();
        let err = tandem_volumes(&domain, &endpoints()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk vdb uses Tandem's NBD endpoint but its <source> has no name='VOLUME'"
        );
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        let cases = [
            ("", "empty"),
            ("   \n", "empty"),
            ("<domain>", "ends inside <domain>"),
            (
                "<domain><devices><disk type='network'>",
                "ends inside <disk>",
            ),
            ("<domain><name>x</nam></domain>", "not well-formed"),
            (
                "<domain><name>x</name></domain><domain/>",
                "second top-level",
            ),
            (
                "<network><name>x</name></network>",
                "root element is <network>",
            ),
            (
                "<domain type='kvm><name>x</name></domain>",
                "not well-formed",
            ),
            ("<domain><disk a='1' a='2'/></domain>", "bad attribute"),
            ("<domain><name>&bogus;</name></domain>", "not well-formed"),
            (
                "<domain><devices><disk type='&nope;'/></devices></domain>",
                "bad attribute",
            ),
            ("garbage", "text outside"),
            ("<domain></domain>trailing", "text outside"),
            ("\u{0}\u{1}<<<>>>", ""),
        ];
        for (xml, expected) in cases {
            let err = match parse_domain(xml) {
                Err(e) => e,
                Ok(d) => panic!("{xml:?} parsed: {d:?}"),
            };
            let message = format!(
                "{err}: {}",
                std::error::Error::source(&err)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(
                message.contains(expected),
                "{xml:?}: message {message:?} lacks {expected:?}"
            );
        }
        // Random byte mutations of real domains: errors or results, never a panic.
        let mut seed: u64 = 0x5eed_1234_abcd_0001;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for name in [
            "virt-manager.xml",
            "namespaces-comments.xml",
            "proxmox-style.xml",
            "vhost-user.xml",
        ] {
            let original = testdata(name).into_bytes();
            for _ in 0..300 {
                let mut bytes = original.clone();
                for _ in 0..(1 + next() % 4) {
                    let at = next() % bytes.len();
                    const NASTY: &[u8] = b"<>/='\"&;! x\0";
                    bytes[at] = NASTY[next() % NASTY.len()];
                }
                let text = String::from_utf8_lossy(&bytes);
                if let Ok(domain) = parse_domain(&text) {
                    let _ = tandem_volumes(&domain, &endpoints());
                }
            }
        }
        let truncated = testdata("virt-manager.xml");
        for cut in (1..truncated.len()).step_by(97) {
            if let Some(prefix) = truncated.get(..cut) {
                assert!(
                    parse_domain(prefix).is_err(),
                    "prefix of {cut} bytes parsed"
                );
            }
        }
    }
}
