//! The agent's hands on libvirt (`virt` crate, blocking): list the active domains, capture a
//! domain's persistent XML, define a domain from stored XML, start and destroy it. Starting
//! a domain runs Tandem's libvirt hook (`prepare`), which promotes its volumes and refuses
//! the start with the engine's message if a volume cannot be promoted here (another node is
//! Primary, no quorum, not UpToDate): the promotion is the tie-break between survivors.

use std::collections::BTreeSet;

use virt::connect::Connect;
use virt::domain::Domain;

/// A failed libvirt call: what was attempted and libvirt's message.
#[derive(Debug, thiserror::Error)]
#[error("libvirt: {operation}: {message}")]
pub struct LibvirtError {
    pub operation: String,
    pub message: String,
}

fn err(operation: impl Into<String>, e: virt::error::Error) -> LibvirtError {
    LibvirtError {
        operation: operation.into(),
        message: e.message().to_string(),
    }
}

/// A connection to one libvirtd, reopened after a failure.
pub struct Hypervisor {
    uri: String,
    conn: Option<Connect>,
}

impl Hypervisor {
    pub fn new(uri: &str) -> Hypervisor {
        // libvirt prints every error to stderr by default; ours carry its message already.
        virt::error::clear_error_callback();
        Hypervisor {
            uri: uri.to_string(),
            conn: None,
        }
    }

    fn conn(&mut self) -> Result<&Connect, LibvirtError> {
        if self.conn.is_none() {
            let c = Connect::open(Some(&self.uri))
                .map_err(|e| err(format!("connecting to {}", self.uri), e))?;
            self.conn = Some(c);
        }
        self.conn.as_ref().ok_or_else(|| LibvirtError {
            operation: "connecting".into(),
            message: "no connection".into(),
        })
    }

    /// Run `f` on the connection; a failure drops the connection so the next call reopens it.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&Connect) -> Result<T, LibvirtError>,
    ) -> Result<T, LibvirtError> {
        let result = f(self.conn()?);
        if result.is_err() {
            let alive = self
                .conn
                .as_ref()
                .is_some_and(|c| c.is_alive().unwrap_or(false));
            if !alive {
                self.conn = None;
            }
        }
        result
    }

    /// Ask libvirtd for its capabilities once, so it probes QEMU now (seconds on a fresh
    /// libvirtd) rather than in the middle of a failover's define/start.
    pub fn warm_up(&mut self) -> Result<(), LibvirtError> {
        self.with(|c| {
            c.capabilities()
                .map(drop)
                .map_err(|e| err("reading capabilities", e))
        })
    }

    /// Names of the active (running or paused) domains.
    pub fn active_domains(&mut self) -> Result<BTreeSet<String>, LibvirtError> {
        self.with(|c| {
            let domains = c
                .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                .map_err(|e| err("listing domains", e))?;
            domains
                .iter()
                .map(|d| d.name().map_err(|e| err("reading a domain name", e)))
                .collect()
        })
    }

    fn lookup(c: &Connect, name: &str) -> Result<Option<Domain>, LibvirtError> {
        match c.lookup_domain_by_name(name) {
            Ok(d) => Ok(Some(d)),
            Err(e)
                if matches!(
                    e.code(),
                    virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(err(format!("looking up {name}"), e)),
        }
    }

    /// The domain's persistent (inactive) XML, secrets included, as a survivor must define it.
    pub fn domain_xml(&mut self, name: &str) -> Result<String, LibvirtError> {
        self.with(|c| {
            let d = Hypervisor::lookup(c, name)?.ok_or_else(|| LibvirtError {
                operation: format!("reading the XML of {name}"),
                message: format!("no domain named '{name}' on this host"),
            })?;
            d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE | virt::sys::VIR_DOMAIN_XML_SECURE)
                .map_err(|e| err(format!("reading the XML of {name}"), e))
        })
    }

    /// Whether `name` is defined here.
    pub fn is_defined(&mut self, name: &str) -> Result<bool, LibvirtError> {
        self.with(|c| Ok(Hypervisor::lookup(c, name)?.is_some()))
    }

    /// Define `name` from `xml` unless it is defined already. Returns whether it defined it.
    pub fn ensure_defined(&mut self, name: &str, xml: &str) -> Result<bool, LibvirtError> {
        self.with(|c| {
            if Hypervisor::lookup(c, name)?.is_some() {
                return Ok(false);
            }
            c.define_domain_xml(xml)
                .map_err(|e| err(format!("defining {name}"), e))?;
            Ok(true)
        })
    }

    /// Start the defined domain `name` (the hook promotes its volumes).
    pub fn start(&mut self, name: &str) -> Result<(), LibvirtError> {
        self.with(|c| {
            let d = Hypervisor::lookup(c, name)?.ok_or_else(|| LibvirtError {
                operation: format!("starting {name}"),
                message: "not defined here".into(),
            })?;
            d.create().map_err(|e| err(format!("starting {name}"), e))?;
            Ok(())
        })
    }

    /// Destroy (hard stop) `name` if it runs here; a domain that stops on its own during the
    /// call counts as destroyed.
    pub fn destroy(&mut self, name: &str) -> Result<(), LibvirtError> {
        self.with(|c| {
            let Some(d) = Hypervisor::lookup(c, name)? else {
                return Ok(());
            };
            if !d
                .is_active()
                .map_err(|e| err(format!("reading the state of {name}"), e))?
            {
                return Ok(());
            }
            match d.destroy() {
                Ok(()) => Ok(()),
                // It died meanwhile (e.g. the fence's SIGKILL won the race): destroyed.
                Err(_) if !d.is_active().unwrap_or(true) => Ok(()),
                Err(e) => Err(err(format!("destroying {name}"), e)),
            }
        })
    }
}
