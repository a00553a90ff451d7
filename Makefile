# vmroam. `make demo` runs a migration lab in network namespaces; `make test`
# runs every test. Both need root (namespaces, TUN devices).

GO      ?= go
BIN     := bin/vmroam
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
FUZZTIME ?= 10s
XEN_SCRIPT_DIR ?= /etc/xen/scripts
LIBVIRT_HOOK_DIR ?= /etc/libvirt/hooks

.PHONY: all build deps test test-long unit lint vet fmt-check bench bench-migration demo fuzz install-xen install-libvirt clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/vmroam

# Debian packages the lab and tests use (iproute2, wireguard-tools, iperf3,
# Xen's hotplug scripts for the Xen hook's test, ...).
deps:
	@scripts/install-deps.sh

lint: vet fmt-check

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

# Every test: unit tests, then the namespace end-to-end suite on its own
# (it measures traffic, so it should not share two cores with the rest),
# race detector on.
test: deps lint
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v /e2e)
	$(GO) test -race -count=1 -timeout 30m ./e2e/

# The opt-in long end-to-end tests (minutes each): 50 migrations in a row.
test-long: deps
	VMROAM_LONG=1 $(GO) test -count=1 -timeout 30m -run '^TestFaultManyMigrations$$' -v ./e2e/

# Unit tests only (no namespaces needed).
unit:
	$(GO) test -race -count=1 -short ./...

# iperf3 TCP VM to VM through vmroam against plain wireguard-go, same run.
bench: deps
	$(GO) test -run '^$$' -bench 'BenchmarkThroughput|BenchmarkHybrid' -benchtime 1x -count=1 -timeout 30m -v ./e2e/

# Migrations with and without the cache: loss, reordering, delay, handover.
bench-migration: deps
	$(GO) test -run '^$$' -bench BenchmarkMigration -benchtime 1x -count=1 -timeout 30m -v ./e2e/
	$(GO) test -run '^$$' -bench 'BenchmarkQueue|BenchmarkClassify' -benchmem ./cache/

# A VM migrates between namespace hosts under pings, with and without the cache;
# the cached move's timeline is drawn into migration.svg.
# RTT=40ms puts each host in a site of its own behind an emulated WAN.
demo: deps build
	$(GO) run ./lab/demo -binary $(BIN) $(if $(RTT),-rtt $(RTT)) $(DEMO_ARGS)

# Each fuzz target for FUZZTIME.
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeRecords$$' -fuzztime $(FUZZTIME) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzMetaUnmarshal$$' -fuzztime $(FUZZTIME) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeNetworks$$' -fuzztime $(FUZZTIME) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeState$$' -fuzztime $(FUZZTIME) ./gossip/
	$(GO) test -run '^$$' -fuzz '^FuzzReader$$' -fuzztime $(FUZZTIME) ./cache/
	$(GO) test -run '^$$' -fuzz '^FuzzClassify$$' -fuzztime $(FUZZTIME) ./cache/
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) ./xenhook/xenstore/
	$(GO) test -run '^$$' -fuzz '^FuzzParseAnnouncement$$' -fuzztime $(FUZZTIME) ./xenhook/

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

clean:
	rm -rf bin
