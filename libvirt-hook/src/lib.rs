//! `tandem-libvirt-hook`: libvirt's QEMU hook for Tandem volumes, and domain-XML helpers.
//!
//! libvirt runs the hook as `/etc/libvirt/hooks/qemu.d/tandem DOMAIN OPERATION SUBOP EXTRA`
//! with the domain XML on stdin. The hook reads the XML ([`domain_xml`]), asks this node's
//! tandemd about the domain's volumes ([`control`]), decides ([`decide`], pure) and carries
//! the decision out ([`execute`]). An incoming live migration is remembered between the
//! `migrate` and `prepare` calls by [`incoming`]; what the hook promoted for a domain is
//! remembered until its `release` by [`promoted`]. [`disk_spec`] writes the `<disk>` element
//! and the virt-install argument for a volume.

pub mod control;
pub mod decide;
pub mod disk_spec;
pub mod domain_xml;
pub mod execute;
pub mod incoming;
pub mod promoted;
