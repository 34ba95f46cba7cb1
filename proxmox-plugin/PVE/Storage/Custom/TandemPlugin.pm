package PVE::Storage::Custom::TandemPlugin;

# Proxmox VE storage plugin for Tandem (storage type `tandem`).
#
# A thin layer over the `tandem ... --json` CLI: every decision about volumes, pools and
# replication belongs to tandemd; this module translates Proxmox's storage API into CLI
# calls and the CLI's answers back. QEMU reaches a volume through tandemd's NBD socket
# (`nbd:unix:<socket>:exportname=<volume>`); opening the export is what promotes the local
# replica, so activate/deactivate only check and never change roles. The one exception is
# live migration: see _arm_incoming_migration and deactivate_volume.
#
# Rules kept throughout:
# - the CLI runs without a shell (list-form exec), with a timeout, stdout and stderr kept
#   apart; any failure becomes `die "tandem: <the CLI's one-line message>\n"`;
# - works under taint mode (PVE's daemons run `perl -T`): every argument is validated by a
#   regex and the capture is what gets passed on;
# - pvestatd's path (check_connection, activate_storage, status of every storage, every 10 s)
#   is cached per tandemd, successes and failures alike, with short timeouts: a healthy cycle
#   costs one `tandem node info --pools` per tandemd, whatever the number of storages, and a
#   hung tandemd one timeout per cycle in total (see $STATUS_TTL and $NODE_INFO_TTL).
#
# SPDX-License-Identifier: AGPL-3.0-or-later

use strict;
use warnings;

use Digest::SHA ();
use Fcntl qw(O_WRONLY O_CREAT O_EXCL);
use IO::Select;
use JSON::PP;
use POSIX ();
use Time::HiRes ();

use base qw(PVE::Storage::Plugin);

# --- tunables (package variables so tests and operators can adjust them) -------------------

# Highest storage APIVER this plugin was tested against, and the oldest it supports
# (PVE 8.0 = 10: `path()` gives `-drive file=nbd:...`; PVE 9 adds qemu_blockdev_options).
our $TESTED_APIVER = 15;
our $MIN_APIVER    = 10;

# Seconds a CLI call may take: `node info` (the connection check PVE runs before anything),
# `node info --pools` (status; runs `lvs` inside tandemd on lvm-thin), reads (show/list),
# changes. The first two keep a cycle of pvestatd within 2 s when tandemd hangs.
our $CHECK_TIMEOUT  = 1.5;
our $STATUS_TIMEOUT = 1.5;
our $READ_TIMEOUT   = 20;
our $CHANGE_TIMEOUT = 60;

# How long answers are reused, per tandemd (one per tandem-config). pvestatd calls
# storage_info every 10 s (9 to 11 s apart, more when a cycle runs long): check_connection and
# activate_storage, then status, of every storage.
# - $STATUS_TTL: status's `tandem node info --pools` (node info and every pool's usage in one
#   call), a failure too, for every process through the cache file. Shorter than pvestatd's
#   interval, so status asks once per cycle.
# - $NODE_INFO_TTL: a successful node info, in this process, for check_connection,
#   activate_storage, get_identity and the NBD socket; status's answer refreshes it. Longer
#   than pvestatd's interval, so each cycle's checks are answered by the previous cycle's
#   status and a healthy cycle costs that one call. A process without a fresh one (a VM
#   start, an allocation) runs the plain `tandem node info`, which never runs `lvs`.
#   A failure counts for $STATUS_TTL only: a dead or hung tandemd is asked once per cycle.
# So pvestatd's checks may pass on an answer one cycle old: a tandemd that stops answering is
# noticed by the next status (within 10 s), whose failure then fails every storage's check
# until tandemd answers again. Elsewhere a check may pass on an answer $NODE_INFO_TTL old; the
# operation itself then fails with tandemd's error.
our $STATUS_TTL    = 5;
our $NODE_INFO_TTL = 25;

# Where `status` keeps its cache (tmpfs: nothing to clean up across reboots).
our $CACHE_DIR = _untaint_abs_path($ENV{TANDEM_PVE_CACHE_DIR}) // '/run/tandem-pve';

# The CLI; TANDEM_CLI overrides it (tests point it at the workspace build).
our $CLI = _untaint_abs_path($ENV{TANDEM_CLI});

my $VOLNAME_RE  = qr/[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}/;
my $DEFAULT_RECONNECT_DELAY = 10;

# --- API version --------------------------------------------------------------------------

sub api {
    # Report the running API version while it lies in the window we tested, so PVE does not
    # warn; outside the window report the tested one and let PVE decide (a newer PVE loads
    # us while our version is within its APIAGE; an older one refuses us cleanly).
    my $running = defined(&PVE::Storage::APIVER) ? PVE::Storage::APIVER() : undef;
    return $running
        if defined($running) && $running >= $MIN_APIVER && $running <= $TESTED_APIVER;
    return $TESTED_APIVER;
}

sub type {
    return 'tandem';
}

sub plugindata {
    return {
        content => [{ images => 1 }, { images => 1 }],
        format  => [{ raw => 1 }, 'raw'],
    };
}

sub properties {
    return {
        'tandem-config' => {
            description => "Tandem configuration file used by the `tandem` CLI to find tandemd "
                . "(default: /etc/tandem/tandem.toml).",
            type      => 'string',
            maxLength => 4096,
        },
        'tandem-pool' => {
            description => "Tandem pool new disks are allocated from; the storage's size and "
                . "disk list are that pool's (default: the first pool of tandem.toml).",
            type      => 'string',
            pattern   => '[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}',
        },
        'tandem-replicas' => {
            description => "Number of replicas of each new disk (passed to "
                . "`tandem volume create --replicas`; default: tandemd's).",
            type    => 'integer',
            minimum => 1,
            maximum => 16,
        },
        'tandem-protocol' => {
            description => "Replication protocol of new disks: C (synchronous, needed for "
                . "live migration), B or A (passed to `tandem volume create --protocol`).",
            type => 'string',
            enum => ['A', 'B', 'C'],
        },
        'tandem-nodes' => {
            description => "Comma-separated Tandem nodes holding the replicas of new disks "
                . "(passed to `tandem volume create --nodes`; default: tandemd's choice).",
            type    => 'string',
            pattern => '[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*',
        },
        'tandem-socket' => {
            description => "tandemd's NBD unix socket QEMU connects to (default: "
                . "<run_dir>/nbd.sock as reported by `tandem node info`).",
            type      => 'string',
            maxLength => 107,
        },
        'tandem-reconnect-delay' => {
            description => "Seconds QEMU holds I/O and retries when the NBD connection to "
                . "tandemd drops (e.g. a tandemd restart).",
            type    => 'integer',
            minimum => 0,
            maximum => 3600,
            default => $DEFAULT_RECONNECT_DELAY,
        },
    };
}

sub options {
    return {
        'tandem-config'          => { optional => 1 },
        'tandem-pool'            => { optional => 1 },
        'tandem-replicas'        => { optional => 1 },
        'tandem-protocol'        => { optional => 1 },
        'tandem-nodes'           => { optional => 1 },
        'tandem-socket'          => { optional => 1 },
        'tandem-reconnect-delay' => { optional => 1 },
        # `shared 1` tells Proxmox every node sees the same disks (replicas), so migration
        # moves only the VM, never the data.
        shared  => { optional => 1 },
        nodes   => { optional => 1 },
        disable => { optional => 1 },
        content => { optional => 1 },
    };
}

# --- names --------------------------------------------------------------------------------

sub parse_volname {
    my ($class, $volname) = @_;
    die "tandem: invalid volume name\n" if !defined($volname);
    if ($volname =~ m/\A((vm|base)-(\d+)-[A-Za-z0-9_.-]+)\z/ && length($1) <= 64) {
        my ($name, $kind, $vmid) = ($1, $2, $3);
        my $is_base = $kind eq 'base' ? 1 : 0;
        return ('images', $name, $vmid, undef, undef, $is_base, 'raw');
    }
    die "tandem: unable to parse volume name '$volname' "
        . "(expected vm-<vmid>-<name> or base-<vmid>-<name>)\n";
}

# The validated (and untainted) volume name.
sub _volume {
    my ($class, $volname) = @_;
    my (undef, $name) = $class->parse_volname($volname);
    return $name;
}

sub _check_no_snapshot {
    my ($snapname) = @_;
    die "tandem: snapshots are not supported yet\n" if defined($snapname) && $snapname ne '';
}

# --- the CLI ------------------------------------------------------------------------------

sub _untaint_abs_path {
    my ($path) = @_;
    return undef if !defined($path) || $path eq '';
    return $1 if $path =~ m{\A(/[^\0\n]*)\z};
    return undef;
}

sub _cli_path {
    return $CLI if defined($CLI);
    for my $candidate ('/usr/bin/tandem', '/usr/local/bin/tandem') {
        return $candidate if -x $candidate;
    }
    return '/usr/bin/tandem';
}

# `tandem [--config P] --json ARGS...` -> the decoded JSON. Dies with the CLI's message.
sub _tandem {
    my ($scfg, $timeout, @args) = @_;
    my @cmd = (_cli_path());
    if (defined(my $config = $scfg->{'tandem-config'})) {
        my $clean = _untaint_abs_path($config)
            // die "tandem: tandem-config must be an absolute path, not '$config'\n";
        push @cmd, '--config', $clean;
    }
    push @cmd, '--json';
    for my $arg (@args) {
        # Callers validated every argument already; this only clears the taint flag.
        $arg =~ m/\A([^\0]*)\z/s or die "tandem: invalid argument\n";
        push @cmd, $1;
    }
    my ($status, $stdout, $stderr) = _run(\@cmd, $timeout);
    my $what = join(' ', 'tandem', @args);
    if ($status != 0) {
        die "tandem: '$what' timed out after ${timeout}s (is tandemd hung?)\n"
            if $status == -1;
        die "tandem: '$what' was killed by signal " . ($status & 127) . "\n" if $status & 127;
        # The CLI prints one line `tandem: <message>`; a usage error (clap) prints
        # `error: <message>` followed by usage hints. Take the last such line, else the last.
        my @lines = grep { m/\S/ } split(/\n/, $stderr);
        my ($message) = reverse grep { m/\A\s*(?:tandem|error):/ } @lines;
        $message //= @lines ? $lines[-1] : "'$what' failed with exit code " . ($status >> 8);
        $message =~ s/\A\s*(?:tandem|error):\s*//;
        die "tandem: $message\n";
    }
    my $json = eval { JSON::PP->new->utf8->decode($stdout) };
    if (!defined($json)) {
        my $err = $@ || 'empty output';
        $err =~ s/\s+at \S+ line \d+.*\z//s;
        die "tandem: cannot parse the output of '$what': $err\n";
    }
    return $json;
}

# Run @$cmd without a shell; returns (wait status or -1 on timeout, stdout, stderr).
sub _run {
    my ($cmd, $timeout) = @_;
    pipe(my $out_r, my $out_w) or die "tandem: cannot create a pipe: $!\n";
    pipe(my $err_r, my $err_w) or die "tandem: cannot create a pipe: $!\n";
    my $pid = fork();
    die "tandem: cannot fork: $!\n" if !defined($pid);
    if ($pid == 0) {
        # Plain descriptors, whatever Perl's STD* handles are tied or reopened to.
        my $null = POSIX::open('/dev/null', POSIX::O_RDONLY());
        POSIX::dup2($null, 0) if defined($null);
        POSIX::dup2(fileno($out_w), 1);
        POSIX::dup2(fileno($err_w), 2);
        $ENV{PATH} = '/usr/sbin:/usr/bin:/sbin:/bin';
        delete @ENV{qw(IFS CDPATH ENV BASH_ENV)};
        { no warnings 'exec'; exec { $cmd->[0] } @$cmd; }
        my $error = "tandem: cannot run $cmd->[0]: $!\n";
        POSIX::write(2, $error, length($error));
        POSIX::_exit(127);
    }
    close($out_w);
    close($err_w);
    my %buf = (out => '', err => '');
    my %name_of = (fileno($out_r) => 'out', fileno($err_r) => 'err');
    my $select = IO::Select->new($out_r, $err_r);
    my $deadline = Time::HiRes::time() + $timeout;
    my $timed_out = 0;
    while ($select->count) {
        my $left = $deadline - Time::HiRes::time();
        if ($left <= 0) {
            $timed_out = 1;
            last;
        }
        for my $fh ($select->can_read($left)) {
            my $n = sysread($fh, my $chunk, 65536);
            if (!defined($n)) {
                next if $!{EINTR} || $!{EAGAIN};
                $n = 0;
            }
            if ($n == 0) {
                $select->remove($fh);
                close($fh);
                next;
            }
            $buf{ $name_of{ fileno($fh) } } .= $chunk;
        }
    }
    if ($timed_out) {
        kill('KILL', $pid);
        waitpid($pid, 0);
        return (-1, $buf{out}, $buf{err});
    }
    # Both pipes closed: the child is exiting; give it the rest of the deadline.
    while (1) {
        my $res = waitpid($pid, POSIX::WNOHANG());
        return ($?, $buf{out}, $buf{err}) if $res == $pid;
        return (0, $buf{out}, $buf{err}) if $res == -1;    # reaped elsewhere (SIGCHLD)
        if (Time::HiRes::time() >= $deadline) {
            kill('KILL', $pid);
            waitpid($pid, 0);
            return (-1, $buf{out}, $buf{err});
        }
        Time::HiRes::sleep(0.01);
    }
}

# The node info of the tandemd a storage talks to (one per `tandem-config`), shared by all
# its storages in this process (see $NODE_INFO_TTL). PVE runs check_connection and
# activate_storage before almost anything, for each storage: pvestatd does for every storage
# every 10 s.
my %node_info_cache;    # tandem-config ('' = the default) -> { ts, info | error }

sub _node_info {
    my ($scfg) = @_;
    my $key = $scfg->{'tandem-config'} // '';
    my $entry = $node_info_cache{$key};
    my $failed = $entry && defined($entry->{error});
    if (!_fresh($entry, $failed ? $STATUS_TTL : $NODE_INFO_TTL)) {
        if ($failed) {
            # Ask again with the pools: in pvestatd the answer that ends an outage then serves
            # this cycle's status too (elsewhere it only costs tandemd an `lvs`).
            $entry = _node_status($scfg);
        } else {
            my $info = eval { _tandem($scfg, $CHECK_TIMEOUT, 'node', 'info') };
            $entry = ref($info) eq 'HASH' ? { info => $info }
                : { error => $@ || "tandem: 'tandem node info' did not return an object\n" };
            # Stamped when the answer arrived, so a slow failure is still reused for a full TTL.
            $entry->{ts} = Time::HiRes::time();
            $node_info_cache{$key} = $entry;
        }
    }
    die $entry->{error} if defined($entry->{error});
    return $entry->{info};
}

# Whether a cache entry is younger than $ttl seconds (a clock stepped back: no).
sub _fresh {
    my ($entry, $ttl) = @_;
    return 0 if ref($entry) ne 'HASH' || !defined($entry->{ts});
    my $age = Time::HiRes::time() - $entry->{ts};
    return $age >= -1 && $age < $ttl;
}

# The node info, after checking that `tandem-pool` (if set) is configured there.
sub _node_with_pool {
    my ($scfg) = @_;
    my $info = _node_info($scfg);
    if (defined(my $pool = $scfg->{'tandem-pool'})) {
        my %pools = map { $_ => 1 } @{ $info->{pools} // [] };
        die "tandem: pool '$pool' is not configured on node '"
            . ($info->{name} // '?') . "'\n" if !$pools{$pool};
    }
    return $info;
}

# The NBD socket QEMU connects to: `tandem-socket`, or <run_dir>/nbd.sock from the daemon.
my %nbd_socket_memo;

sub _nbd_socket {
    my ($scfg) = @_;
    my $socket;
    if (defined($scfg->{'tandem-socket'})) {
        $socket = _untaint_abs_path($scfg->{'tandem-socket'})
            // die "tandem: tandem-socket must be an absolute path\n";
    } else {
        my $key = $scfg->{'tandem-config'} // '';
        $socket = $nbd_socket_memo{$key} //= do {
            my $info = _node_info($scfg);
            my $run_dir = _untaint_abs_path($info->{run_dir})
                // die "tandem: 'tandem node info' reported no run_dir\n";
            "$run_dir/nbd.sock";
        };
    }
    # `nbd:unix:<socket>:exportname=` cannot carry a ':' inside the socket path.
    die "tandem: NBD socket path '$socket' must not contain ':'\n" if $socket =~ m/:/;
    return $socket;
}

# --- paths and QEMU -----------------------------------------------------------------------

sub filesystem_path {
    my ($class, $scfg, $volname, $snapname) = @_;
    _check_no_snapshot($snapname);
    my (undef, $name, $vmid, undef, undef, undef, undef) = $class->parse_volname($volname);
    my $path = 'nbd:unix:' . _nbd_socket($scfg) . ":exportname=$name";
    return wantarray ? ($path, $vmid, 'images') : $path;
}

sub path {
    my ($class, $scfg, $volname, $storeid, $snapname) = @_;
    return $class->filesystem_path($scfg, $volname, $snapname);
}

sub qemu_blockdev_options {
    my ($class, $scfg, $storeid, $volname, $machine_version, $opts) = @_;
    _check_no_snapshot($opts->{'snapshot-name'}) if ref($opts) eq 'HASH';
    my $name = $class->_volume($volname);
    my $delay = $scfg->{'tandem-reconnect-delay'} // $DEFAULT_RECONNECT_DELAY;
    return {
        driver => 'nbd',
        server => { type => 'unix', path => '' . _nbd_socket($scfg) },
        export => "$name",
        'reconnect-delay' => int($delay),
    };
}

sub map_volume {
    my ($class, $storeid, $scfg, $volname, $snapname, $hints) = @_;
    die "tandem: mapping a volume as a local block device (containers, TPM state) "
        . "is not supported yet\n";
}

sub unmap_volume {
    return 1;
}

# --- volumes ------------------------------------------------------------------------------

sub _volume_list {
    my ($scfg, $cache) = @_;
    my $key = 'tandem:' . ($scfg->{'tandem-config'} // '');
    return $cache->{$key} if ref($cache) eq 'HASH' && $cache->{$key};
    my $list = _tandem($scfg, $READ_TIMEOUT, 'volume', 'list');
    die "tandem: 'tandem volume list' did not return a list\n" if ref($list) ne 'ARRAY';
    $cache->{$key} = $list if ref($cache) eq 'HASH';
    return $list;
}

# The first free vm-<vmid>-disk-<n> on this node (the daemon refuses a name taken elsewhere).
sub _free_disk_name {
    my ($scfg, $vmid) = @_;
    my %taken = map { ($_->{name} // '') => 1 } @{ _volume_list($scfg) };
    my $n = 0;
    $n++ while $taken{"vm-$vmid-disk-$n"};
    return "vm-$vmid-disk-$n";
}

sub alloc_image {
    my ($class, $storeid, $scfg, $vmid, $fmt, $name, $size_kib) = @_;
    die "tandem: unsupported format '$fmt' (tandem volumes are raw)\n"
        if defined($fmt) && $fmt ne 'raw';
    $vmid =~ m/\A(\d+)\z/ or die "tandem: invalid VMID '$vmid'\n";
    $vmid = $1;
    defined($size_kib) && $size_kib =~ m/\A(\d+)\z/
        or die "tandem: invalid size '" . ($size_kib // '') . "' (KiB expected)\n";
    my $bytes = $1 * 1024;    # Proxmox passes KiB here, and only here.

    if (defined($name) && $name ne '') {
        my (undef, $clean, $owner) = $class->parse_volname($name);
        die "tandem: illegal name '$name' - should be 'vm-$vmid-*'\n"
            if $owner ne $vmid || $clean !~ m/\Avm-/;
        $name = $clean;
    } else {
        $name = _free_disk_name($scfg, $vmid);
    }

    my @args = ('volume', 'create', $name, '--size', "$bytes");
    push @args, '--pool', _checked_pool($scfg) if defined($scfg->{'tandem-pool'});
    if (defined(my $replicas = $scfg->{'tandem-replicas'})) {
        $replicas =~ m/\A(\d+)\z/ or die "tandem: tandem-replicas must be a number\n";
        push @args, '--replicas', $1;
    }
    if (defined(my $protocol = $scfg->{'tandem-protocol'})) {
        $protocol =~ m/\A([ABC])\z/ or die "tandem: tandem-protocol must be A, B or C\n";
        push @args, '--protocol', $1;
    }
    if (defined(my $nodes = $scfg->{'tandem-nodes'})) {
        $nodes =~ m/\A([A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*)\z/
            or die "tandem: tandem-nodes must be a comma-separated list of node names\n";
        push @args, '--nodes', $1;
    }
    _tandem($scfg, $CHANGE_TIMEOUT, @args);
    return $name;
}

sub _checked_pool {
    my ($scfg) = @_;
    my $pool = $scfg->{'tandem-pool'};
    $pool =~ m/\A($VOLNAME_RE)\z/ or die "tandem: invalid tandem-pool '$pool'\n";
    return $1;
}

sub free_image {
    my ($class, $storeid, $scfg, $volname, $is_base, $format) = @_;
    my $name = $class->_volume($volname);
    _tandem($scfg, $CHANGE_TIMEOUT, 'volume', 'delete', $name);
    return undef;
}

sub list_images {
    my ($class, $storeid, $scfg, $vmid, $vollist, $cache) = @_;
    my %wanted = map { $_ => 1 } @{ $vollist // [] };
    my $pool = $scfg->{'tandem-pool'};
    my @result;
    for my $volume (@{ _volume_list($scfg, $cache) }) {
        next if defined($pool) && ($volume->{pool} // '') ne $pool;
        my (undef, $name, $owner) = eval { $class->parse_volname($volume->{name} // '') };
        next if !defined($name);    # not a Proxmox disk
        my $volid = "$storeid:$name";
        if ($vollist) {
            next if !$wanted{$volid};
        } elsif (defined($vmid)) {
            next if $owner ne $vmid;
        }
        push @result, {
            volid  => $volid,
            format => 'raw',
            size   => ($volume->{size_bytes} // 0) + 0,
            vmid   => $owner,
            ctime  => $volume->{created_unix},
        };
    }
    return \@result;
}

sub _show {
    my ($class, $scfg, $volname, $timeout) = @_;
    my $name = $class->_volume($volname);
    my $volume = _tandem($scfg, $timeout // $READ_TIMEOUT, 'volume', 'show', $name);
    die "tandem: 'tandem volume show $name' returned no size\n"
        if ref($volume) ne 'HASH' || !defined($volume->{size_bytes});
    return $volume;
}

sub volume_size_info {
    my ($class, $scfg, $storeid, $volname, $timeout) = @_;
    $timeout = $READ_TIMEOUT if !$timeout || $timeout !~ m/\A\d+(\.\d+)?\z/;
    my $volume = $class->_show($scfg, $volname, $timeout);
    my $size = $volume->{size_bytes} + 0;
    # A raw block volume: Proxmox counts it as fully used.
    return wantarray ? ($size, 'raw', $size, undef, $volume->{created_unix}) : $size;
}

sub volume_resize {
    my ($class, $scfg, $storeid, $volname, $size, $running, $snapname) = @_;
    _check_no_snapshot($snapname);
    my $name = $class->_volume($volname);
    # PVE follows a resize of a running VM's disk with QMP block_resize, which QEMU's NBD
    # client refuses ("Cannot grow NBD nodes"); growing first would leave the volume and the
    # VM config disagreeing. Refuse before changing anything.
    die "tandem: growing the disk of a running VM is not supported yet (QEMU cannot grow "
        . "an attached NBD disk); resize it while the VM is stopped\n" if $running;
    defined($size) && $size =~ m/\A(\d+)\z/
        or die "tandem: invalid size '" . ($size // '') . "' (bytes expected)\n";
    _tandem($scfg, $CHANGE_TIMEOUT, 'volume', 'resize', $name, '--size', $1);
    return;
}

# Reassign a disk to another VM (or rename it): `tandem volume rename` on every node of the
# volume. The daemon refuses while the volume is open or Primary anywhere, while a node is
# unreachable, or when the target name exists on any node.
sub rename_volume {
    my ($class, $scfg, $storeid, $source_volname, $target_vmid, $target_volname) = @_;
    my (undef, $source, undef, undef, undef, $is_base) = $class->parse_volname($source_volname);
    die "tandem: renaming a base volume (template) is not supported\n" if $is_base;
    defined($target_vmid) && $target_vmid =~ m/\A(\d+)\z/
        or die "tandem: invalid target VMID '" . ($target_vmid // '') . "'\n";
    $target_vmid = $1;
    my $target;
    if (defined($target_volname) && $target_volname ne '') {
        my (undef, $clean, $owner, undef, undef, $target_base) =
            $class->parse_volname($target_volname);
        die "tandem: illegal target name '$target_volname' - should be 'vm-$target_vmid-*'\n"
            if $owner ne $target_vmid || $target_base;
        $target = $clean;
    } else {
        $target = _free_disk_name($scfg, $target_vmid);
    }
    _tandem($scfg, $CHANGE_TIMEOUT, 'volume', 'rename', $source, $target);
    return "$storeid:$target";
}

# The feature table of PVE's LvmThinPlugin, except a copy *of a snapshot*: a snapshot is
# not served over NBD, so `qm clone --snapname` makes a linked clone (clone/snap), never a
# full copy from it.
my %FEATURES = (
    snapshot   => { current => 1 },
    clone      => { base => 1, snap => 1 },
    template   => { current => 1 },
    # Full copies read the volume through NBD (qemu-img convert / drive-mirror).
    copy       => { base => 1, current => 1 },
    # A new volume reads as zeros (sparse file, thin LV), so copies may skip zero blocks.
    sparseinit => { base => 1, current => 1 },
    # Reassigning a disk to another VM (`qm disk reassign`, `qm move-disk --target-vmid`).
    rename     => { current => 1 },
);

sub volume_has_feature {
    my ($class, $scfg, $feature, $storeid, $volname, $snapname, $running, $opts) = @_;
    my $is_base = (eval { ($class->parse_volname($volname))[5] }) ? 1 : 0;
    my $key = (defined($snapname) && $snapname ne '') ? 'snap' : $is_base ? 'base' : 'current';
    return 1 if $FEATURES{$feature} && $FEATURES{$feature}{$key};
    return undef;
}

# --- snapshots, templates, linked clones -----------------------------------------------
#
# `tandem snapshot ...` snapshots every replica at one point of the write stream (tandemd
# pauses the VM's writes for the cut); `tandem volume clone` makes a linked clone on the
# same nodes. PVE's qemu-server freezes the guest's file systems first when the guest
# agent runs (`qm snapshot` without --vmstate).

# The validated (and untainted) snapshot name.
sub _snapshot_name {
    my ($snap) = @_;
    defined($snap) && $snap =~ m/\A($VOLNAME_RE)\z/
        or die "tandem: invalid snapshot name '" . ($snap // '') . "'\n";
    return $1;
}

sub _snapshot_list {
    my ($scfg, $name) = @_;
    my $list = _tandem($scfg, $READ_TIMEOUT, 'snapshot', 'list', $name);
    die "tandem: 'tandem snapshot list $name' did not return a list\n" if ref($list) ne 'ARRAY';
    return $list;
}

sub volume_snapshot {
    my ($class, $scfg, $storeid, $volname, $snap) = @_;
    my $name = $class->_volume($volname);
    _tandem($scfg, $CHANGE_TIMEOUT, 'snapshot', 'create', $name, _snapshot_name($snap));
    return undef;
}

# tandemd refuses a rollback while the volume is open or Primary anywhere (PVE stops the VM
# first) and rolls every replica back with a new shared generation.
sub volume_snapshot_rollback {
    my ($class, $scfg, $storeid, $volname, $snap) = @_;
    my $name = $class->_volume($volname);
    _tandem($scfg, $CHANGE_TIMEOUT, 'snapshot', 'rollback', $name, _snapshot_name($snap));
    return undef;
}

# Thin snapshots and reflinks keep every snapshot usable, whichever is the newest (as on
# LVM-thin): a rollback is possible when the snapshot exists.
sub volume_rollback_is_possible {
    my ($class, $scfg, $storeid, $volname, $snap, $blockers) = @_;
    my $name = $class->_volume($volname);
    my $wanted = _snapshot_name($snap);
    return 1 if grep { ($_->{name} // '') eq $wanted } @{ _snapshot_list($scfg, $name) };
    die "tandem: snapshot '$wanted' of '$name' does not exist\n";
}

sub volume_snapshot_delete {
    my ($class, $scfg, $storeid, $volname, $snap, $running) = @_;
    my $name = $class->_volume($volname);
    _tandem($scfg, $CHANGE_TIMEOUT, 'snapshot', 'delete', $name, _snapshot_name($snap));
    return undef;
}

# { <snapshot> => { name, nodes } } for every snapshot of the volume.
sub volume_snapshot_info {
    my ($class, $scfg, $storeid, $volname) = @_;
    my $name = $class->_volume($volname);
    my %info;
    for my $snap (@{ _snapshot_list($scfg, $name) }) {
        my $snapname = $snap->{name} // next;
        $info{$snapname} = { name => $snapname, nodes => $snap->{nodes} // [] };
    }
    return \%info;
}

sub rename_snapshot {
    die "tandem: renaming a snapshot is not supported yet\n";
}

# `qm template`: vm-<vmid>-disk-N becomes the read-only base-<vmid>-disk-N (renamed on every
# node of the volume). Refused while the volume has snapshots, as on LVM-thin.
sub create_base {
    my ($class, $storeid, $scfg, $volname) = @_;
    my (undef, $name, undef, undef, undef, $is_base) = $class->parse_volname($volname);
    die "tandem: create_base not possible with base image\n" if $is_base;
    my @snapshots = map { $_->{name} // '?' } @{ _snapshot_list($scfg, $name) };
    die "tandem: unable to create base volume - '$name' has snapshots ("
        . join(', ', @snapshots) . "); delete them first\n" if @snapshots;
    (my $base = $name) =~ s/\Avm-/base-/;
    _tandem($scfg, $CHANGE_TIMEOUT, 'volume', 'rename', $name, $base);
    _tandem($scfg, $CHANGE_TIMEOUT, 'volume', 'set', $base, '--read-only');
    return $base;
}

# A linked clone of a base volume (template) or of a snapshot, as the next free
# vm-<vmid>-disk-N; it lives on the same nodes and pool as its origin.
sub clone_image {
    my ($class, $scfg, $storeid, $volname, $vmid, $snap) = @_;
    my (undef, $name, undef, undef, undef, $is_base) = $class->parse_volname($volname);
    defined($vmid) && $vmid =~ m/\A(\d+)\z/ or die "tandem: invalid VMID '" . ($vmid // '') . "'\n";
    $vmid = $1;
    my $origin;
    if (defined($snap) && $snap ne '') {
        $origin = "$name\@" . _snapshot_name($snap);
    } else {
        die "tandem: clone_image only works on base images\n" if !$is_base;
        $origin = $name;
    }
    my $clone = _free_disk_name($scfg, $vmid);
    _tandem($scfg, $CHANGE_TIMEOUT, 'volume', 'clone', $origin, $clone);
    return $clone;
}

sub storage_can_replicate {
    return 0;
}

sub volume_export_formats {
    return ();
}

sub volume_import_formats {
    return ();
}

# --- storage and volume activation --------------------------------------------------------

# PVE::Storage::activate_storage runs check_connection, then activate_storage: both answer
# from one (cached) `tandem node info`.
sub check_connection {
    my ($class, $storeid, $scfg) = @_;
    _node_info($scfg);
    return 1;
}

sub activate_storage {
    my ($class, $storeid, $scfg, $cache) = @_;
    _node_with_pool($scfg);
    return 1;
}

sub deactivate_storage {
    return 1;
}

# The backend's identity (APIVER 14; GET /nodes/{node}/storage/{storage}/identity):
# `tandem:<pool>@<cluster>`, the same on every node and whatever the storage is called.
# <cluster> is the first 16 hex digits of the SHA-256 of the node list all nodes' tandem.toml
# share (name, control and replication address of each node, sorted). Tandem has no cluster
# UUID yet, so the identity changes when that node list does.
sub get_identity {
    my ($class, $scfg, $storeid) = @_;
    my $info = _node_with_pool($scfg);
    my $pool = $scfg->{'tandem-pool'} // ($info->{pools} // [])->[0]
        // die "tandem: 'tandem node info' reported no pool\n";
    my @nodes = sort map { join(' ', map { $_ // '' } @{$_}{qw(name control replication)}) }
        grep { ref($_) eq 'HASH' } @{ $info->{nodes} // [] };
    die "tandem: 'tandem node info' reported no nodes\n" if !@nodes;
    my $cluster = substr(Digest::SHA::sha256_hex(join("\n", @nodes)), 0, 16);
    return "tandem:$pool\@$cluster";
}

sub activate_volume {
    my ($class, $storeid, $scfg, $volname, $snapname, $cache, $hints) = @_;
    _check_no_snapshot($snapname);
    # Idempotent: checks that the volume exists with its storage. The local replica is
    # promoted by tandemd when QEMU opens the NBD export for writing.
    my $volume = $class->_show($scfg, $volname);
    # `missing`: the definition exists but its storage is gone on this node. Any other
    # state is tandemd's to judge when QEMU opens the export.
    die "tandem: volume '$volume->{name}' is missing on this node\n"
        if ($volume->{state} // '') eq 'missing';
    _arm_incoming_migration($scfg, $class->_volume($volname));
    return 1;
}

# This node's `tandem volume status NAME`, or undef for an unreplicated volume.
sub _replica_status {
    my ($scfg, $name) = @_;
    my $status = _tandem($scfg, $READ_TIMEOUT, 'volume', 'status', $name);
    return undef if ref($status) ne 'HASH' || ref($status->{peers}) ne 'ARRAY';
    return undef if !@{ $status->{peers} };
    return $status;
}

# Proxmox gives a storage plugin no migration hook: an `activate_volume` on this node while
# the volume is Primary on another node is the destination of a live migration. Allow two
# Primaries (tandemd sets it on every node of the volume) so that the destination QEMU's
# open promotes this replica next to the source's. Refused, before anything changes, unless
# the volume runs protocol C and this replica is UpToDate.
sub _arm_incoming_migration {
    my ($scfg, $name) = @_;
    my $status = _replica_status($scfg, $name) // return;
    return if ($status->{role} // '') eq 'Primary';
    my @primaries = map { $_->{node} }
        grep { ($_->{role} // '') eq 'Primary' } @{ $status->{peers} };
    return if !@primaries;
    my $here = $status->{node} // 'this node';
    my $protocol = $status->{protocol} // '?';
    die "tandem: $name is Primary on $primaries[0] and runs protocol $protocol; "
        . "live migration needs protocol C\n" if $protocol ne 'C';
    my $disk = $status->{disk_state} // '?';
    die "tandem: $name is Primary on $primaries[0]; the replica on $here is $disk, "
        . "live migration needs it UpToDate\n" if $disk ne 'UpToDate';
    return if $status->{allow_two_primaries};
    _tandem($scfg, $CHANGE_TIMEOUT, 'volume', 'allow-two-primaries', $name, 'on');
    return;
}

sub deactivate_volume {
    my ($class, $storeid, $scfg, $volname, $snapname, $cache) = @_;
    # tandemd demotes when the last writer closes the export. The end of a live migration
    # (on the source) or of a failed one (on the destination) closes the two-Primaries
    # window; tandemd also closes it by itself once only one Primary is left.
    # A failure here must not fail the VM's stop: warn, tandemd closes the window anyway.
    my $name = $class->_volume($volname);
    eval {
        my $status = _replica_status($scfg, $name);
        _tandem($scfg, $CHANGE_TIMEOUT, 'volume', 'allow-two-primaries', $name, 'off')
            if $status && $status->{allow_two_primaries};
    };
    warn "tandem: $name: could not switch two Primaries off: $@" if $@;
    return 1;
}

# --- status (pvestatd calls this every 10 s) ----------------------------------------------

sub status {
    my ($class, $storeid, $scfg, $cache) = @_;
    my $entry = _node_status($scfg);
    die $entry->{error} if defined($entry->{error});
    my $pools = $entry->{pools};
    my $want = $scfg->{'tandem-pool'};
    my ($pool) = defined($want) ? grep { ($_->{name} // '') eq $want } @$pools : @$pools;
    die "tandem: pool '" . ($want // '') . "' not found on this node\n" if !$pool;
    # A pool whose backend could not be queried fails its storages only.
    die "tandem: $pool->{error}\n" if defined($pool->{error});
    return ($pool->{total_bytes} + 0, $pool->{free_bytes} + 0, $pool->{used_bytes} + 0, 1);
}

# `tandem node info --pools` of the tandemd a storage talks to: { ts, info, pools } or
# { ts, error }. Shared by all its storages and by every process (pvestatd, pvedaemon, pvesm)
# through $CACHE_DIR/status-<sha1 of tandem-config>.json for $STATUS_TTL seconds, a failure
# too; its node info (or failure) also answers this process's next checks (_node_info).
sub _node_status {
    my ($scfg) = @_;
    my $key = $scfg->{'tandem-config'} // '';
    Digest::SHA::sha1_hex($key) =~ m/\A([0-9a-f]{40})\z/ or die "tandem: sha1_hex failed\n";
    my $file = "$CACHE_DIR/status-$1.json";

    my $entry = _read_cache($file);
    if (!_fresh($entry, $STATUS_TTL)) {
        my $answer = eval { _tandem($scfg, $STATUS_TIMEOUT, 'node', 'info', '--pools') };
        $entry = ref($answer) eq 'HASH' && ref($answer->{pool_list}) eq 'ARRAY'
            ? { pools => delete($answer->{pool_list}), info => $answer }
            : { error => $@ || "tandem: 'tandem node info --pools' did not return the node "
                . "and its pools\n" };
        # Stamped when the answer arrived, so a slow failure is still reused for a full TTL.
        $entry->{ts} = Time::HiRes::time();
        $entry->{config} = $key;    # for whoever reads the file
        _write_cache($file, $entry);
    }
    my $known = $node_info_cache{$key};
    if (!$known || !defined($known->{ts}) || $known->{ts} < $entry->{ts}) {
        $node_info_cache{$key} = defined($entry->{error})
            ? { ts => $entry->{ts}, error => $entry->{error} }
            : { ts => $entry->{ts}, info => $entry->{info} };
    }
    return $entry;
}

sub _read_cache {
    my ($file) = @_;
    open(my $fh, '<', $file) or return undef;
    local $/;
    my $text = <$fh>;
    close($fh);
    my $entry = eval { JSON::PP->new->decode($text // '') };
    return ref($entry) eq 'HASH' ? $entry : undef;
}

sub _write_cache {
    my ($file, $entry) = @_;
    # Best effort: a cache that cannot be written only makes status slower.
    eval {
        if (!-d $CACHE_DIR) {
            mkdir($CACHE_DIR, 0700) or $!{EEXIST} or die "mkdir $CACHE_DIR: $!\n";
        }
        my $tmp = "$file.tmp.$$";
        sysopen(my $fh, $tmp, O_WRONLY | O_CREAT | O_EXCL, 0600) or die "open $tmp: $!\n";
        print {$fh} JSON::PP->new->canonical->encode($entry) or die "write $tmp: $!\n";
        close($fh) or die "close $tmp: $!\n";
        rename($tmp, $file) or do { unlink($tmp); die "rename $tmp: $!\n" };
    };
    warn "tandem: cannot write status cache: $@" if $@;
    return;
}

1;
