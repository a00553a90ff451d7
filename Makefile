# vmroam. `make demo` runs a migration lab in network namespaces; `make test`
# runs every test. Both need root (namespaces, TUN devices).

GO      ?= go
BIN     := bin/vmroam
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
FUZZTIME ?= 60s
# More flags for every fuzz run: a new input is minimized for at most 10 s so
# that large inputs do not eat the run; on a shared machine add -parallel 1.
FUZZFLAGS ?= -fuzzminimizetime 10s
XEN_SCRIPT_DIR ?= /etc/xen/scripts
LIBVIRT_HOOK_DIR ?= /etc/libvirt/hooks
PROXMOX_SNIPPETS_DIR ?= /var/lib/vz/snippets
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
# Units of locally installed programs: $(PREFIX)/lib/systemd/system. Local
# overrides (`systemctl edit vmroam`) go to /etc/systemd/system.
UNITDIR ?= $(PREFIX)/lib/systemd/system
# `make package` writes the .deb and .rpm to PKGDIR, with nfpm built from
# the version packaging/tools/go.mod pins.
PKGDIR ?= bin/package
NFPM ?= bin/nfpm
# The packages' file times and the man page's date: the last commit's.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || date +%s)

.PHONY: all build deps test test-long soak unit lint vet fmt-check fuzz-check bench bench-migration demo dashboard-picture fuzz sim scale install install-xen install-libvirt install-proxmox package clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/vmroam

# Debian packages the lab and tests use (iproute2, wireguard-tools, iperf3,
# Xen's hotplug scripts for the Xen hook's test, ...).
deps:
	@scripts/install-deps.sh

lint: vet fmt-check fuzz-check

# Every fuzz target is in the fuzz target's list below and keeps a corpus.
fuzz-check:
	@scripts/check-fuzz-targets.sh

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

# Every test: unit tests, then the lab's own tests and the namespace
# end-to-end suite, each on its own (they measure traffic, QEMU guests among
# them, so they should not share two cores with the rest), race detector on.
test: deps lint
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v -e /e2e -e '/lab$$')
	$(GO) test -race -count=1 -timeout 20m ./lab/
	$(GO) test -race -count=1 -timeout 30m ./e2e/

# The opt-in long end-to-end tests (minutes each): 50 migrations in a row.
test-long: deps
	VMROAM_LONG=1 $(GO) test -count=1 -timeout 30m -run '^TestFaultManyMigrations$$' -v ./e2e/

# Migrations around three hosts under traffic for SOAK (10m by default), agents
# built with the race detector; then no goroutine, fd, heap, route, rule or
# namespace may have grown.
SOAK ?= 10m
soak: deps
	VMROAM_SOAK=$(SOAK) $(GO) test -race -count=1 -timeout 60m -run '^TestSoak$$' -v ./e2e/

# Redraws docs/monitoring-dashboard.png: the dashboard's queries over a lab
# migration, evaluated by a real Prometheus (Debian's prometheus package).
dashboard-picture: deps
	VMROAM_DASHBOARD_PNG=$(CURDIR)/docs/monitoring-dashboard.png $(GO) test -count=1 -run '^TestMonitoringOnALab$$' -v ./e2e/

# Unit tests only (no namespaces needed).
unit:
	$(GO) test -race -count=1 -short ./...

# iperf3 TCP VM to VM through vmroam against plain wireguard-go, same run.
bench: deps
	$(GO) test -run '^$$' -bench 'BenchmarkThroughput|BenchmarkHybrid' -benchtime 1x -count=1 -timeout 30m -v ./e2e/

# Migrations with and without the cache: loss, reordering, delay, handover.
# RTT=40ms adds the same between sites that far apart (the WAN lab).
bench-migration: deps
	$(GO) test -run '^$$' -bench BenchmarkMigration -benchtime 1x -count=1 -timeout 60m -v ./e2e/ $(if $(RTT),-args -rtt=$(RTT))
	$(GO) test -run '^$$' -bench 'BenchmarkQueue|BenchmarkClassify' -benchmem ./cache/

# A VM migrates between namespace hosts under pings, with and without the cache;
# the cached move's timeline is drawn into migration.svg.
# RTT=40ms puts each host in a site of its own behind an emulated WAN.
demo: deps build
	$(GO) run ./lab/demo -binary $(BIN) $(if $(RTT),-rtt $(RTT)) $(DEMO_ARGS)

# The propagation simulation: SIMAGENTS agents' gossip on 127.0.0.1, how
# long a new location record takes to reach all of them, with memberlist's
# LAN, WAN and local configurations, SIMRECORDS records each (DESIGN.md,
# field notes). It keeps both cores busy for about a quarter of an hour:
# not part of make test (TestPropagation runs it small there).
SIMAGENTS ?= 200
SIMRECORDS ?= 30
# local (memberlist's loopback test configuration) did not converge with 200
# agents on a loaded 2-core machine: SIMPROFILES=local SIMAGENTS=50.
SIMPROFILES ?= lan,wan
sim:
	$(GO) test -run '^$$' -bench '^BenchmarkPropagation$$' -benchtime $(SIMRECORDS)x -count 1 -timeout 90m -v ./gossip/ -args -sim.agents=$(SIMAGENTS) -sim.profiles=$(SIMPROFILES)

# The scale measurement (issue 23): SCALEAGENTS agents' gossip on 127.0.0.1
# holding SCALEVIPS VIPs between them (the whole table in every agent, V/N
# owned by each), SCALECLAIMS new records spread at each size: their spread
# p50/p99, packets and bytes, the push/pull size and time, heap and CPU per
# agent, as a table (README, "Scale"). A size taking longer than
# SCALEBUDGET is stopped and larger ones are skipped. It keeps both cores
# busy for a quarter of an hour (12 min on 2026-12-07): not part of make test (TestScaleHarness runs it
# tiny there).
SCALEAGENTS ?= 50,100,200,400
SCALEVIPS ?= 10000,100000
SCALECLAIMS ?= 20
SCALEBUDGET ?= 3m
scale:
	VMROAM_SCALE=1 $(GO) test -run '^TestScale$$' -count 1 -timeout 90m -v ./gossip/ -args -scale.agents=$(SCALEAGENTS) -scale.vips=$(SCALEVIPS) -scale.claims=$(SCALECLAIMS) -scale.budget=$(SCALEBUDGET)

# Each fuzz target for FUZZTIME, one after the other. Every decoder of what
# arrives from the network or from another process has one; new inputs the
# fuzzer finds land in `go env GOCACHE`/fuzz: copy the interesting ones to
# the package's testdata/fuzz/<target>/ (scripts/check-fuzz-targets.sh, run by
# make lint, fails for a target missing here or without a corpus there).
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeRecords$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzMetaUnmarshal$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeNetworks$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeState$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeLeave$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeKeyOp$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeKeyReply$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzParseKeys$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzReader$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./cache/
	$(GO) test -run '^$$' -fuzz '^FuzzRequest$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./cache/
	$(GO) test -run '^$$' -fuzz '^FuzzReceive$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./cache/
	$(GO) test -run '^$$' -fuzz '^FuzzPreview$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./cache/
	$(GO) test -run '^$$' -fuzz '^FuzzClassify$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./cache/
	$(GO) test -run '^$$' -fuzz '^FuzzFixZero$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./internal/udpcsum/
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./xenhook/xenstore/
	$(GO) test -run '^$$' -fuzz '^FuzzParseAnnouncement$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./xenhook/
	$(GO) test -run '^$$' -fuzz '^FuzzDomainVIPs$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./xenhook/
	$(GO) test -run '^$$' -fuzz '^FuzzDomidOfVif$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./xenhook/
	$(GO) test -run '^$$' -fuzz '^FuzzProxmoxVIPs$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./xenhook/
	$(GO) test -run '^$$' -fuzz '^FuzzHandler$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./wgagent/control/
	$(GO) test -run '^$$' -fuzz '^FuzzParsePeerAllowlist$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./wgagent/
	$(GO) test -run '^$$' -fuzz '^FuzzStateFile$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./wgagent/
	$(GO) test -run '^$$' -fuzz '^FuzzParseICMP$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./wgagent/doctor/
	$(GO) test -run '^$$' -fuzz '^FuzzWithFile$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./cmd/vmroam/
	$(GO) test -run '^$$' -fuzz '^FuzzConfigFile$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./cmd/vmroam/
	$(GO) test -run '^$$' -fuzz '^FuzzFlowHash$$' -fuzztime $(FUZZTIME) $(FUZZFLAGS) ./lab/wanem/

# The binary, the systemd unit (its paths follow PREFIX and SYSCONFDIR) and,
# only when there is none yet, the example config: an operator's file is
# never overwritten. DESTDIR stages the install (packaging).
install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/vmroam
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/vmroam
	sed -e 's|/usr/local/bin/vmroam|$(PREFIX)/bin/vmroam|g' -e 's|/etc/vmroam/|$(SYSCONFDIR)/vmroam/|g' \
		scripts/systemd/vmroam.service > $(DESTDIR)$(UNITDIR)/vmroam.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/vmroam.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/vmroam/vmroam.toml ]; then \
		echo "kept $(DESTDIR)$(SYSCONFDIR)/vmroam/vmroam.toml (docs/vmroam.example.toml has every key)"; \
	else \
		install -m 0644 docs/vmroam.example.toml $(DESTDIR)$(SYSCONFDIR)/vmroam/vmroam.toml; \
	fi
	@[ -n "$(DESTDIR)" ] || echo "next: edit $(SYSCONFDIR)/vmroam/vmroam.toml, then systemctl daemon-reload && systemctl enable --now vmroam"

# The Xen hotplug hook: vif-route and vif-bridge source it when a vif goes
# online or offline. DESTDIR stages the install (packaging).
install-xen:
	install -d $(DESTDIR)$(XEN_SCRIPT_DIR)/vif-post.d
	install -m 0755 scripts/xen/vmroam.hook $(DESTDIR)$(XEN_SCRIPT_DIR)/vif-post.d/vmroam.hook

# The libvirt hook. libvirt runs every executable in hooks/qemu.d/ (since
# libvirt 6.5; older ones run only hooks/qemu, which must then call it) when
# it starts, migrates or stops a QEMU VM. It looks for hooks when it starts:
# restart libvirtd or virtqemud after installing.
install-libvirt:
	install -d $(DESTDIR)$(LIBVIRT_HOOK_DIR)/qemu.d
	install -m 0755 scripts/libvirt/qemu $(DESTDIR)$(LIBVIRT_HOOK_DIR)/qemu.d/vmroam

# The Proxmox VE hookscript, into the snippets of the "local" storage (on
# every node: a migration's target runs it too). A VM uses it after
# qm set VMID --hookscript local:snippets/vmroam.sh.
install-proxmox:
	install -d $(DESTDIR)$(PROXMOX_SNIPPETS_DIR)
	install -m 0755 scripts/proxmox/vmroam-hookscript $(DESTDIR)$(PROXMOX_SNIPPETS_DIR)/vmroam.sh

# The .deb and .rpm (packaging/nfpm.yaml says what they hold): a static,
# stripped binary in /usr/bin, the unit with its paths, the example config
# as a conffile, the Xen, libvirt and Proxmox VE hooks in /usr/lib/vmroam
# (not linked into place: not enabled), the docs and the man page, made
# from the binary's --help. Their version is VERSION's (packaging/version.sh).
package:
	$(GO) -C packaging/tools build -o $(abspath $(NFPM)) github.com/goreleaser/nfpm/v2/cmd/nfpm
	rm -rf $(PKGDIR)/files && rm -f $(PKGDIR)/vmroam_*.deb $(PKGDIR)/vmroam-*.rpm
	install -d $(PKGDIR)/files
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o $(PKGDIR)/files/vmroam ./cmd/vmroam
	sed -e 's|/usr/local/bin/vmroam|/usr/bin/vmroam|g' scripts/systemd/vmroam.service > $(PKGDIR)/files/vmroam.service
	$(GO) run ./scripts/genman -date $$(date -u -d @$(SOURCE_DATE_EPOCH) +%F) $(PKGDIR)/files/vmroam > $(PKGDIR)/files/vmroam.1
	gzip -9n $(PKGDIR)/files/vmroam.1
	for p in deb rpm; do \
		PKG_VERSION=$$(packaging/version.sh $(VERSION)) PKG_ARCH=$$($(GO) env GOARCH) PKG_FILES=$(PKGDIR)/files \
		SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(NFPM) package --config packaging/nfpm.yaml --packager $$p --target $(PKGDIR)/ || exit 1; \
	done

clean:
	rm -rf bin
