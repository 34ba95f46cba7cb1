//! The NBD frontend (issue 4): serves every volume to QEMU and standard NBD clients.
