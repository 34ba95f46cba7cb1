# Build and install Tandem.
#
#   make build                      # release build of every binary in the workspace
#   sudo make install               # binaries, systemd units (tandemd, tandem-ha), example config
#   make install DESTDIR=/tmp/pkg   # staged install (packaging)
#
# An existing /etc/tandem/tandem.toml is never overwritten.

PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
SBINDIR    ?= $(PREFIX)/sbin
SYSCONFDIR ?= /etc
UNITDIR    ?= /etc/systemd/system
DESTDIR    ?=
CARGO      ?= cargo
RELEASE    := target/release

.PHONY: build install uninstall

build:
	$(CARGO) build --release --workspace --bins

install: build
	install -D -m 0755 $(RELEASE)/tandemd $(DESTDIR)$(SBINDIR)/tandemd
	install -D -m 0755 $(RELEASE)/tandem $(DESTDIR)$(BINDIR)/tandem
	install -D -m 0755 $(RELEASE)/tandem-ha $(DESTDIR)$(BINDIR)/tandem-ha
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|@SBINDIR@|$(SBINDIR)|g; s|@SYSCONFDIR@|$(SYSCONFDIR)|g' packaging/tandemd.service \
		> $(DESTDIR)$(UNITDIR)/tandemd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/tandemd.service
	sed 's|@BINDIR@|$(BINDIR)|g; s|@SYSCONFDIR@|$(SYSCONFDIR)|g' packaging/tandem-ha.service \
		> $(DESTDIR)$(UNITDIR)/tandem-ha.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/tandem-ha.service
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/tandem
	install -m 0644 packaging/tandem.toml.example $(DESTDIR)$(SYSCONFDIR)/tandem/tandem.toml.example
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/tandem/tandem.toml ]; then \
		echo "keeping existing $(DESTDIR)$(SYSCONFDIR)/tandem/tandem.toml"; \
	else \
		install -m 0644 packaging/tandem.toml.example $(DESTDIR)$(SYSCONFDIR)/tandem/tandem.toml; \
		echo "installed $(DESTDIR)$(SYSCONFDIR)/tandem/tandem.toml: edit it, then systemctl enable --now tandemd (and tandem-ha on HA hosts)"; \
	fi
	-@[ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && systemctl daemon-reload || true

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/tandemd $(DESTDIR)$(BINDIR)/tandem
	rm -f $(DESTDIR)$(BINDIR)/tandem-ha
	rm -f $(DESTDIR)$(UNITDIR)/tandemd.service
	rm -f $(DESTDIR)$(UNITDIR)/tandem-ha.service
	rm -f $(DESTDIR)$(SYSCONFDIR)/tandem/tandem.toml.example
	@echo "kept $(SYSCONFDIR)/tandem/tandem.toml, /var/lib/tandem and every volume"
