//! `tandem-ha run`: the agent. Three parts share one [`Shared`] state:
//!
//! - the listener (tokio) answers other agents and the CLI on `<control IP>:<port>`
//!   (heartbeats, registry pushes, `manage`, status queries; see [`crate::wire`]);
//! - one dialer per peer (tokio) sends a heartbeat every interval and pushes the registry
//!   when the peer's digest differs; any message from a peer refreshes its liveness;
//! - the decision loop (a plain thread: libvirt and tandemd calls block) ticks every
//!   `tick_ms`: reads the active domains and each managed VM's disk status, tracks where
//!   each VM runs, calls [`crate::decide::decide`] and carries the action out (start
//!   through libvirt — the hook promotes — or destroy to fence), then publishes what it
//!   found for the heartbeats and `status`.
//!
//! Where a VM runs ("owner") is learned from the local libvirt and the peers' heartbeats,
//! and persisted with the fencing and failover memory in `<state_dir>/ha/placement.json`
//! ([`crate::placement`]): an agent restarted while the VM's host is dead still fails the
//! VM over. A restarted agent gives every peer it has not heard from yet `dead_after_ms`
//! from its own start before it counts it dead, so it never starts a VM that runs on a
//! host it simply has not heard from yet.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use control_api::Role;
use replication::auth::{AuthRole, Secret};
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::AgentConfig;
use crate::decide::{decide, Action, PeerView, VmInput};
use crate::disks::{volumes_of, DiskReader};
use crate::events::{now_ms, EventLog};
use crate::hypervisor::Hypervisor;
use crate::metrics::HaMetrics;
use crate::placement::Placement;
use crate::registry::{ManagedVm, Registry};
use crate::status::{AgentStatus, Failover, PeerLiveness, VmStatus};
use crate::watchdog::Pet;
use crate::wire::{dial, Conn, Heartbeat, Message};

/// What a peer told us last.
#[derive(Debug, Clone, Default)]
struct PeerState {
    last_heard: Option<Instant>,
    running: Vec<String>,
    eligible: Vec<String>,
    starting: Vec<String>,
    due: Vec<String>,
    digest: String,
    /// Its decision loop has run at least once (its running list is meaningful).
    ready: bool,
    alive_reported: bool,
}

/// State shared by the listener, the dialers and the decision loop.
struct Shared {
    registry: Registry,
    peers: BTreeMap<String, PeerState>,
    /// Managed VMs active here (from the last tick, plus one just started).
    running: Vec<String>,
    /// Managed VMs this node could start, and those whose failover is due here (each
    /// updated as soon as its VM is decided).
    eligible: Vec<String>,
    due: Vec<String>,
    /// The managed VM the decision loop is starting here right now, since when.
    starting: Option<(String, Instant)>,
    ready: bool,
    status: AgentStatus,
}

/// The running agent.
pub struct Agent {
    cfg: AgentConfig,
    secret: Secret,
    shared: Mutex<Shared>,
    events: Arc<EventLog>,
    pet: Arc<Pet>,
    /// When this agent started (peers not heard from yet get dead-after from here).
    started: Instant,
    metrics: HaMetrics,
}

impl Agent {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registry_path(&self) -> std::path::PathBuf {
        self.cfg.ha_dir().join("registry.json")
    }

    fn placement_path(&self) -> std::path::PathBuf {
        placement_path(&self.cfg)
    }

    /// Persist the loop's placement if it changed since the last successful save.
    fn save_placement(&self, st: &mut LoopState) {
        if st.placement == st.saved {
            return;
        }
        match st.placement.save(&self.placement_path()) {
            Ok(()) => {
                st.saved = st.placement.clone();
                if st.save_error.take().is_some() {
                    self.events.emit("placement_saved", json!({}));
                }
            }
            Err(e) => {
                let message = format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                );
                if st.save_error.as_deref() != Some(message.as_str()) {
                    tracing::error!(error = %message, "cannot persist the placement; retrying every tick");
                    self.events
                        .emit("placement_save_failed", json!({"error": message}));
                    st.save_error = Some(message);
                }
            }
        }
    }

    fn own_heartbeat(&self) -> Message {
        let s = self.lock();
        let (eligible, starting) = announced_starts(
            &s.eligible,
            s.starting.as_ref(),
            self.cfg.ha.start_timeout(),
        );
        Message::Heartbeat(Heartbeat {
            node: self.cfg.here().to_string(),
            running: s.running.clone(),
            eligible,
            starting,
            due: s.due.clone(),
            registry_digest: s.registry.digest(),
            ready: s.ready,
        })
    }

    /// A heartbeat from a configured peer.
    fn heard(&self, hb: Heartbeat) {
        let mut s = self.lock();
        let Some(p) = s.peers.get_mut(&hb.node) else {
            return;
        };
        p.last_heard = Some(Instant::now());
        p.running = hb.running;
        p.eligible = hb.eligible;
        p.starting = hb.starting;
        p.due = hb.due;
        p.digest = hb.registry_digest;
        p.ready = hb.ready;
    }

    /// Merge `entries` into the registry, persist, log. Returns an error message on failure.
    fn store(&self, incoming: Registry, via: &str) -> Result<(), String> {
        let mut s = self.lock();
        let before = s.registry.clone();
        if !s.registry.merge(incoming) {
            return Ok(());
        }
        if let Err(e) = s.registry.save(&self.registry_path()) {
            s.registry = before;
            return Err(format!("{e:#}"));
        }
        for (name, vm) in &s.registry.vms {
            if before.vms.get(name) != Some(vm) {
                let event = if vm.removed { "unmanaged" } else { "managed" };
                self.events.emit(
                    event,
                    json!({"vm": name, "prefer": vm.prefer, "origin": vm.origin, "via": via}),
                );
            }
        }
        Ok(())
    }

    fn answer(&self, message: Message, from: &str) -> Message {
        match message {
            Message::Heartbeat(hb) => {
                if hb.node == self.cfg.here() || !self.lock().peers.contains_key(&hb.node) {
                    return Message::Error {
                        message: format!("'{}' is not a peer of {}", hb.node, self.cfg.here()),
                    };
                }
                self.heard(hb);
                self.own_heartbeat()
            }
            Message::Registry { registry, node } => match self.store(registry, &node) {
                Ok(()) => Message::Ok,
                Err(message) => Message::Error { message },
            },
            Message::Manage { vm } => {
                let mut one = Registry::default();
                one.apply(vm);
                match self.store(one, from) {
                    Ok(()) => Message::Ok,
                    Err(message) => Message::Error { message },
                }
            }
            Message::StatusQuery => Message::Status {
                status: Box::new(self.lock().status.clone()),
            },
            other => Message::Error {
                message: format!("unexpected message {other:?}"),
            },
        }
    }

    async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let agent = self.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let timeout = agent.cfg.ha.dead_after();
                let mut conn = match Conn::establish(
                    stream,
                    &agent.secret,
                    AuthRole::Acceptor,
                    addr.to_string(),
                    timeout,
                )
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "refused a connection");
                        return;
                    }
                };
                loop {
                    // A connection idle for long is dropped (a dialer sends every interval).
                    let message =
                        match tokio::time::timeout(Duration::from_secs(60), conn.recv()).await {
                            Ok(Ok(Some(m))) => m,
                            Ok(Ok(None)) | Err(_) => return,
                            Ok(Err(e)) => {
                                tracing::debug!(%addr, error = %e, "peer connection ended");
                                return;
                            }
                        };
                    let answer = agent.answer(message, &addr.to_string());
                    if conn.send(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    async fn dial_peer(self: Arc<Self>, peer: String, addr: std::net::SocketAddr) {
        let interval = self.cfg.ha.heartbeat_interval();
        let timeout = self.cfg.ha.dead_after();
        loop {
            let started = Instant::now();
            match dial(addr, &self.secret, interval.max(Duration::from_secs(1))).await {
                Ok(mut conn) => {
                    if let Err(e) = self
                        .heartbeat_loop(&peer, &mut conn, interval, timeout)
                        .await
                    {
                        tracing::debug!(peer, error = %e, "heartbeat connection lost");
                    }
                }
                Err(e) => tracing::debug!(peer, error = %e, "cannot reach peer agent"),
            }
            let spent = started.elapsed();
            if spent < interval {
                tokio::time::sleep(interval - spent).await;
            }
        }
    }

    async fn heartbeat_loop(
        &self,
        peer: &str,
        conn: &mut Conn<tokio::net::TcpStream>,
        interval: Duration,
        timeout: Duration,
    ) -> Result<(), crate::wire::WireError> {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let answer = conn.request(&self.own_heartbeat(), timeout).await?;
            let Message::Heartbeat(hb) = answer else {
                tracing::warn!(
                    peer,
                    ?answer,
                    "peer answered a heartbeat with something else"
                );
                return Ok(());
            };
            if hb.node != peer {
                tracing::warn!(
                    peer,
                    answered_as = hb.node,
                    "peer agent answers with another name"
                );
                return Ok(());
            }
            let ours = self.lock().registry.clone();
            let differs = hb.registry_digest != ours.digest();
            self.heard(hb);
            if differs {
                let push = Message::Registry {
                    node: self.cfg.here().to_string(),
                    registry: ours,
                };
                if let Message::Error { message } = conn.request(&push, timeout).await? {
                    tracing::warn!(peer, message, "peer refused our registry");
                }
            }
        }
    }
}

/// Decision-loop memory that only the loop touches.
struct LoopState {
    /// Where VMs run, VMs whose fencing still needs a demotion (retried every tick until
    /// the engine accepts), last failovers: persisted ([`Placement`]).
    placement: Placement,
    /// What was last written to `placement.json`.
    saved: Placement,
    save_error: Option<String>,
    backoff: HashMap<String, (Instant, String)>,
    /// Since when a failover of each VM has been due here (see [`VmInput::settled`]).
    due_since: HashMap<String, Instant>,
    /// The last demotion error reported per VM (an event only when it changes).
    demote_errors: HashMap<String, String>,
}

impl Agent {
    fn tick(&self, hv: &mut Hypervisor, disks: &mut DiskReader, st: &mut LoopState) {
        let here = self.cfg.here().to_string();
        let dead_after = self.cfg.ha.dead_after();
        let now = Instant::now();
        let managed: Vec<ManagedVm> = self.lock().registry.managed().cloned().collect();
        let alive = |p: &PeerState| {
            p.last_heard
                .is_some_and(|t| now.duration_since(t) < dead_after)
        };
        // Not heard yet since this agent started: presumed alive for dead-after.
        let in_grace = now.duration_since(self.started) < dead_after;
        let alive_or_unknown = |p: &PeerState| alive(p) || (p.last_heard.is_none() && in_grace);

        // Liveness changes become events.
        {
            let mut s = self.lock();
            for (name, p) in s.peers.iter_mut() {
                let a = p
                    .last_heard
                    .is_some_and(|t| now.duration_since(t) < dead_after);
                if a != p.alive_reported {
                    p.alive_reported = a;
                    let silent_ms = p
                        .last_heard
                        .map(|t| now.duration_since(t).as_millis() as u64);
                    self.events.emit(
                        if a { "peer_up" } else { "peer_down" },
                        json!({"peer": name, "path": "management", "silent_ms": silent_ms}),
                    );
                }
            }
        }

        let active = match hv.active_domains() {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list domains; deciding nothing this tick");
                None
            }
        };
        let node_order = self.cfg.node_order();
        let mut running_here_list = Vec::new();
        let mut vm_status = Vec::new();
        let mut pet_list = Vec::new();
        for vm in &managed {
            let Some(active) = &active else { break };
            // Read for each VM: starting the previous one may have taken seconds.
            let peers = self.lock().peers.clone();
            let running_here = active.contains(&vm.name);
            // Where does it run?
            let owners = &mut st.placement.owners;
            if running_here {
                owners.insert(vm.name.clone(), here.clone());
            } else if owners.get(&vm.name) == Some(&here) {
                owners.remove(&vm.name);
            }
            for (name, p) in &peers {
                if alive(p) && p.ready {
                    if p.running.contains(&vm.name) {
                        owners.insert(vm.name.clone(), name.clone());
                    } else if owners.get(&vm.name) == Some(name) {
                        // Alive and not running it: stopped cleanly there.
                        owners.remove(&vm.name);
                    }
                }
            }
            let volumes = volumes_of(&vm.xml, &self.cfg.cluster);
            let disk_views = volumes.clone().and_then(|vols| {
                if vols.is_empty() {
                    Ok(Vec::new())
                } else {
                    disks.read(&vols)
                }
            });
            if let Some((until, _)) = st.backoff.get(&vm.name) {
                if now >= *until {
                    st.backoff.remove(&vm.name);
                }
            }
            let owner = st.placement.owners.get(&vm.name).cloned();
            let peer_views: Vec<PeerView> = peers
                .iter()
                .map(|(name, p)| PeerView {
                    node: name.clone(),
                    management_alive: alive_or_unknown(p),
                    heard: p.last_heard.is_some(),
                    eligible: p.eligible.contains(&vm.name),
                    running: p.ready && p.running.contains(&vm.name),
                    starting: p.starting.contains(&vm.name),
                    due: p.due.contains(&vm.name),
                })
                .collect();
            let due_for = st
                .due_since
                .get(&vm.name)
                .map(|since| now.duration_since(*since));
            let settle = 2 * self.cfg.ha.heartbeat_interval();
            let input = VmInput {
                vm: &vm.name,
                here: &here,
                running_here,
                disks: disk_views.clone(),
                owner: owner.as_deref(),
                peers: peer_views,
                prefer: &vm.prefer,
                node_order: &node_order,
                backoff: st.backoff.get(&vm.name).map(|(_, why)| why.clone()),
                settled: due_for.is_some_and(|d| d >= settle),
                overdue: due_for.is_some_and(|d| d >= settle + dead_after),
            };
            let decision = decide(&input);
            if decision.failover_due {
                st.due_since.entry(vm.name.clone()).or_insert(now);
            } else {
                st.due_since.remove(&vm.name);
            }
            {
                // Published at once, not at the end of the tick: starting another VM
                // may take seconds, and the peers weigh this one meanwhile.
                let mut s = self.lock();
                set_listed(&mut s.eligible, &vm.name, decision.eligible);
                set_listed(&mut s.due, &vm.name, decision.failover_due);
            }
            let mut running_now = running_here;
            match &decision.action {
                Action::Nothing | Action::Wait => {}
                Action::Fence => {
                    self.events.emit(
                        "decision",
                        json!({"vm": vm.name, "action": "fence", "reason": decision.reason}),
                    );
                    // Remember the pending demotion before acting: an agent that dies
                    // between the destroy and the demotion finishes it after its restart.
                    st.placement.demote_pending.insert(vm.name.clone());
                    self.save_placement(st);
                    // SIGKILL QEMU first: virDomainDestroy sends SIGTERM and waits up to
                    // 10 s for a QEMU stuck on frozen I/O before it kills.
                    let pid_dir = std::path::Path::new(crate::watchdog::QEMU_PID_DIR);
                    if let Some(pid) = crate::watchdog::qemu_pid(pid_dir, &vm.name) {
                        // SAFETY: kill(2) on the pid libvirt recorded for this domain's QEMU.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    match hv.destroy(&vm.name) {
                        Ok(()) => {
                            running_now = false;
                            st.placement.owners.remove(&vm.name);
                            self.events
                                .emit("fenced", json!({"vm": vm.name, "reason": decision.reason}));
                        }
                        Err(e) => self.events.emit(
                            "fence_failed",
                            json!({"vm": vm.name, "error": e.to_string()}),
                        ),
                    }
                }
                Action::Start { fence_peer } => {
                    self.events.emit(
                        "decision",
                        json!({"vm": vm.name, "action": "start", "reason": decision.reason}),
                    );
                    let from = owner.clone().unwrap_or_default();
                    let last_heard = peers.get(&from).and_then(|p| p.last_heard);
                    // Peers see the start in progress (their next heartbeat) and wait for
                    // it instead of starting the VM too.
                    self.lock().starting = Some((vm.name.clone(), Instant::now()));
                    let started = self.start_here(hv, vm, fence_peer.as_deref());
                    {
                        // A successful start is announced as running at once.
                        let mut s = self.lock();
                        s.starting = None;
                        if started.is_ok() {
                            s.running.push(vm.name.clone());
                        }
                    }
                    match started {
                        Ok(()) => {
                            running_now = true;
                            st.placement.owners.insert(vm.name.clone(), here.clone());
                            let done = Instant::now();
                            // A host never heard since this agent started (restarted while
                            // it was dead): measured from the agent's start.
                            let since = |t: Option<Instant>, to: Instant| {
                                to.duration_since(t.unwrap_or(self.started)).as_millis() as u64
                            };
                            let f = Failover {
                                vm: vm.name.clone(),
                                from: from.clone(),
                                to: here.clone(),
                                at_ms: now_ms(),
                                detect_ms: since(last_heard, now),
                                total_ms: since(last_heard, done),
                            };
                            self.events.emit(
                                "failover",
                                json!({"vm": vm.name, "from": f.from, "to": f.to, "detect_ms": f.detect_ms, "total_ms": f.total_ms}),
                            );
                            self.metrics.failover(f.total_ms);
                            st.placement.failovers.insert(vm.name.clone(), f);
                        }
                        Err(e) => {
                            let backoff = self.cfg.ha.start_backoff();
                            let why = format!(
                                "start failed: {e}; retrying in {} s",
                                backoff.as_secs_f32()
                            );
                            self.events
                                .emit("start_failed", json!({"vm": vm.name, "error": e}));
                            st.backoff
                                .insert(vm.name.clone(), (Instant::now() + backoff, why));
                        }
                    }
                }
            }
            if running_now {
                running_here_list.push(vm.name.clone());
                pet_list.push((vm.name.clone(), volumes.clone().unwrap_or_default()));
                st.placement.demote_pending.remove(&vm.name);
            } else if st.placement.demote_pending.contains(&vm.name) {
                self.demote_fenced(&vm.name, &disk_views, disks, st);
            }
            let owner_now = st.placement.owners.get(&vm.name).cloned();
            let health = match (&owner_now, running_now) {
                (_, true) => match &disk_views {
                    Ok(d) if d.iter().any(|d| !d.quorum) => {
                        "running without quorum (I/O frozen)".to_string()
                    }
                    Err(e) => format!("running (disk status unknown: {e})"),
                    _ => "running".to_string(),
                },
                (Some(o), false) => {
                    if peers.get(o).is_some_and(alive) {
                        "running".to_string()
                    } else if peers.get(o).is_some_and(alive_or_unknown) {
                        format!("unknown (this agent has not heard from {o} yet)")
                    } else {
                        format!("down (host {o} not heard from)")
                    }
                }
                (None, false) => "stopped".to_string(),
            };
            let action = match &decision.action {
                Action::Nothing => "nothing",
                Action::Wait => "wait",
                Action::Start { .. } => "start",
                Action::Fence => "fence",
            };
            vm_status.push(VmStatus {
                name: vm.name.clone(),
                prefer: vm.prefer.clone(),
                running_on: owner_now,
                running_here: running_now,
                health,
                action: action.to_string(),
                reason: decision.reason.clone(),
                eligible: decision.eligible,
                last_failover: st.placement.failovers.get(&vm.name).cloned(),
            });
        }
        if active.is_none() {
            return;
        }
        // Forget VMs unmanaged meanwhile.
        let names = managed.iter().map(|v| v.name.as_str()).collect();
        st.placement.retain_managed(&names);
        self.save_placement(st);
        self.pet.pet(pet_list);
        let mut s = self.lock();
        s.running = running_here_list;
        s.eligible.retain(|n| names.contains(n.as_str()));
        s.due.retain(|n| names.contains(n.as_str()));
        s.ready = true;
        s.status = AgentStatus {
            node: here,
            ts_ms: now_ms(),
            peers: s
                .peers
                .iter()
                .map(|(name, p)| PeerLiveness {
                    node: name.clone(),
                    management_alive: alive(p),
                    last_heard_ms_ago: p
                        .last_heard
                        .map(|t| now.duration_since(t).as_millis() as u64),
                })
                .collect(),
            vms: vm_status,
        };
    }

    /// Demote by force the volumes of a VM this agent fenced (still Primary here): its
    /// frozen requests fail, so the isolated side is Secondary with failed I/O and rejoins
    /// as SyncTarget when the network heals. Retried every tick until all are Secondary.
    fn demote_fenced(
        &self,
        vm: &str,
        views: &crate::decide::Disks,
        disks: &mut DiskReader,
        st: &mut LoopState,
    ) {
        let Ok(views) = views else { return };
        let mut failed = None;
        let mut demoted = Vec::new();
        for d in views.iter().filter(|d| d.role == Role::Primary) {
            match disks.demote_force(&d.volume) {
                Ok(()) => demoted.push(d.volume.clone()),
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            None => {
                st.placement.demote_pending.remove(vm);
                st.demote_errors.remove(vm);
                self.events.emit(
                    "demoted",
                    json!({"vm": vm, "volumes": demoted, "force": true}),
                );
            }
            Some(e) => {
                if st.demote_errors.get(vm) != Some(&e) {
                    self.events.emit(
                        "demote_failed",
                        json!({"vm": vm, "error": e, "retrying": true}),
                    );
                    st.demote_errors.insert(vm.to_string(), e);
                }
            }
        }
    }

    /// Fence the dead owner if configured, define the domain if needed, start it.
    fn start_here(
        &self,
        hv: &mut Hypervisor,
        vm: &ManagedVm,
        fence_peer: Option<&str>,
    ) -> Result<(), String> {
        if let (Some(cmd), Some(peer)) = (&self.cfg.ha.fence_command, fence_peer) {
            self.events
                .emit("fence_peer", json!({"peer": peer, "command": cmd}));
            run_fence_command(
                cmd,
                peer,
                Duration::from_millis(self.cfg.ha.fence_timeout_ms),
            )
            .map_err(|e| format!("fencing {peer} failed: {e}"))?;
        }
        if hv
            .ensure_defined(&vm.name, &vm.xml)
            .map_err(|e| e.to_string())?
        {
            self.events.emit("defined", json!({"vm": vm.name}));
        }
        hv.start(&vm.name).map_err(|e| e.to_string())?;
        self.events.emit("started", json!({"vm": vm.name}));
        Ok(())
    }
}

/// What a heartbeat says about starts: the eligible list and the VM being started. A
/// start running for `timeout` or longer (libvirtd or the hook hangs) is no longer
/// announced, and neither is the VM's eligibility, so another node may take it over.
fn announced_starts(
    eligible: &[String],
    starting: Option<&(String, Instant)>,
    timeout: Duration,
) -> (Vec<String>, Vec<String>) {
    match starting {
        Some((vm, since)) if since.elapsed() >= timeout => (
            eligible.iter().filter(|e| *e != vm).cloned().collect(),
            Vec::new(),
        ),
        Some((vm, _)) => (eligible.to_vec(), vec![vm.clone()]),
        None => (eligible.to_vec(), Vec::new()),
    }
}

/// Put `name` in `list` or take it out.
fn set_listed(list: &mut Vec<String>, name: &str, listed: bool) {
    let at = list.iter().position(|n| n == name);
    match (at, listed) {
        (None, true) => list.push(name.to_string()),
        (Some(i), false) => {
            list.remove(i);
        }
        _ => {}
    }
}

/// Run the operator's fencing command for `peer` (`{node}` replaced, also in
/// `TANDEM_FENCE_NODE`) through `sh -c`; success is exit status 0 within `timeout`.
pub fn run_fence_command(cmd: &str, peer: &str, timeout: Duration) -> Result<(), String> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd.replace("{node}", peer))
        .env("TANDEM_FENCE_NODE", peer)
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("`{cmd}` exited with {status}")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{cmd}` did not finish within {} s",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

impl Agent {
    /// Serve `/metrics` on `metrics_listen` (off when empty). Observation only: a port
    /// that cannot be bound is logged and the agent runs without it.
    async fn start_metrics(self: Arc<Self>) {
        let Ok(Some(addr)) = self.cfg.ha.metrics_addr() else {
            return;
        };
        let listener = match volume_driver::metrics_http::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot serve metrics (metrics_listen); continuing without them");
                return;
            }
        };
        tracing::info!(%addr, "metrics listening on http://{addr}/metrics");
        let render = move || {
            let agent = Arc::clone(&self);
            async move {
                let status = agent.lock().status.clone();
                agent.metrics.render(&status)
            }
        };
        tokio::spawn(async move {
            if let Err(e) = volume_driver::metrics_http::serve(listener, render).await {
                tracing::error!(%addr, error = %e, "metrics endpoint stopped");
            }
        });
    }
}

/// `<state_dir>/ha/placement.json`.
fn placement_path(cfg: &AgentConfig) -> std::path::PathBuf {
    cfg.ha_dir().join("placement.json")
}

/// Run the agent until killed.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    let here = cfg.here().to_string();
    let secret = replication::auth::load_secret(&cfg.cluster.secret_file).with_context(|| {
        format!(
            "loading the shared secret {}",
            cfg.cluster.secret_file.display()
        )
    })?;
    let listen = cfg
        .agent_addr(&here)
        .with_context(|| format!("node '{here}' is not in the config's [[nodes]]"))?;
    let registry_path = cfg.ha_dir().join("registry.json");
    let registry = Registry::load(&registry_path).context("loading the managed-VM registry")?;
    let mut placement =
        Placement::load(&placement_path(&cfg)).context("loading where the managed VMs ran")?;
    placement.retain_managed(&registry.managed().map(|v| v.name.as_str()).collect());
    let peers = cfg
        .cluster
        .nodes
        .iter()
        .filter(|n| n.name != here)
        .map(|n| (n.name.clone(), PeerState::default()))
        .collect();
    let events = Arc::new(EventLog::new(cfg.ha_dir().join("events.jsonl"), &here));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} (agent port on the management address)"))?;
    events.emit(
        "agent_started",
        json!({"listen": listen.to_string(), "managed": registry.managed().count(),
               "heartbeat_interval_ms": cfg.ha.heartbeat_interval_ms, "dead_after_ms": cfg.ha.dead_after_ms,
               "known_owners": placement.owners, "demote_pending": placement.demote_pending}),
    );
    let agent = Arc::new(Agent {
        secret,
        shared: Mutex::new(Shared {
            registry,
            peers,
            running: Vec::new(),
            eligible: Vec::new(),
            starting: None,
            due: Vec::new(),
            ready: false,
            status: AgentStatus {
                node: here.clone(),
                ts_ms: now_ms(),
                peers: Vec::new(),
                vms: Vec::new(),
            },
        }),
        events: events.clone(),
        pet: Arc::new(Pet::default()),
        started: Instant::now(),
        metrics: HaMetrics::default(),
        cfg,
    });
    agent.clone().start_metrics().await;
    if agent.cfg.ha.soft_watchdog_ms > 0 {
        crate::watchdog::spawn(
            agent.pet.clone(),
            Duration::from_millis(agent.cfg.ha.soft_watchdog_ms),
            DiskReader::new(&agent.cfg.cluster),
            events,
        )
        .context("starting the soft watchdog")?;
    }
    tokio::spawn(agent.clone().serve(listener));
    for node in agent.cfg.cluster.nodes.iter().filter(|n| n.name != here) {
        if let Some(addr) = agent.cfg.agent_addr(&node.name) {
            tokio::spawn(agent.clone().dial_peer(node.name.clone(), addr));
        }
    }
    let loop_agent = agent.clone();
    let decisions = std::thread::Builder::new()
        .name("decide".into())
        .spawn(move || {
            let mut hv = Hypervisor::new(&loop_agent.cfg.ha.libvirt_uri);
            let mut disks = DiskReader::new(&loop_agent.cfg.cluster);
            if let Err(e) = hv.warm_up() {
                tracing::warn!(error = %e, "libvirt not ready yet");
            }
            let mut st = LoopState {
                saved: placement.clone(),
                placement,
                save_error: None,
                backoff: HashMap::new(),
                due_since: HashMap::new(),
                demote_errors: HashMap::new(),
            };
            loop {
                let started = Instant::now();
                loop_agent.tick(&mut hv, &mut disks, &mut st);
                let tick = loop_agent.cfg.ha.tick();
                if let Some(rest) = tick.checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        })
        .context("starting the decision loop")?;
    tokio::task::spawn_blocking(move || decisions.join())
        .await
        .context("decision loop")?
        .map_err(|_| anyhow::anyhow!("the decision loop panicked"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_is_announced_until_it_times_out_then_the_vm_is_not_claimed() {
        let eligible = vec!["vm1".to_string(), "vm2".to_string()];
        let timeout = Duration::from_secs(60);
        let now = Instant::now();
        assert_eq!(
            announced_starts(&eligible, None, timeout),
            (eligible.clone(), vec![])
        );
        let fresh = ("vm1".to_string(), now);
        assert_eq!(
            announced_starts(&eligible, Some(&fresh), timeout),
            (eligible.clone(), vec!["vm1".to_string()])
        );
        // Started `timeout` ago or longer: hung.
        assert_eq!(
            announced_starts(&eligible, Some(&fresh), Duration::ZERO),
            (vec!["vm2".to_string()], vec![])
        );
    }

    #[test]
    fn set_listed_adds_once_and_removes() {
        let mut list = vec!["a".to_string()];
        set_listed(&mut list, "b", true);
        set_listed(&mut list, "b", true);
        assert_eq!(list, ["a", "b"]);
        set_listed(&mut list, "a", false);
        set_listed(&mut list, "a", false);
        assert_eq!(list, ["b"]);
    }
}
