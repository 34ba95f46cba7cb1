package TandemTest;

# Shared by the plugin tests: loads the REAL Proxmox VE storage code vendored in
# ../shared/vendor/pve (upstream pve-storage, pve-common, pve-cluster modules; shims only for
# /etc/pve, the RPC environment and RADOS, see its README), registers the plugin through
# PVE::Storage's own custom-plugin loader, runs a real tandemd with a file pool in a
# throw-away directory (killed in END, even when a test dies), and offers a fake `tandem`
# that records its argv.
#
# The vendor tree is found from this file: <repo>/../shared/vendor/pve. Without it every test
# dies saying so (never a silent skip).
#
# Binaries: $TANDEM_BIN_DIR, else $CARGO_TARGET_DIR/debug, else <repo>/target/debug
# (`cargo build -p tandem-volume-driver --bins` first).

use strict;
use warnings;

use Cwd ();
use File::Basename ();
use File::Temp ();
use IO::Socket::UNIX;
use JSON::PP ();
use POSIX ();
use Time::HiRes ();
use Exporter 'import';

our @EXPORT_OK =
    qw(plugin loader_verdict storage_cfg start_daemon fake_cli run_cmd untaint wait_for);

# Taint mode: exec needs a clean environment.
$ENV{PATH} = '/usr/sbin:/usr/bin:/sbin:/bin';
delete @ENV{qw(IFS CDPATH ENV BASH_ENV TANDEM_CONFIG)};

sub untaint {
    my ($value) = @_;
    $value =~ m/\A(.*)\z/s;
    return $1;
}

my $lib = untaint(Cwd::abs_path(File::Basename::dirname(__FILE__)));    # t/lib
our $PLUGIN_DIR = untaint(Cwd::abs_path("$lib/../.."));                 # proxmox-plugin
our $REPO = untaint(Cwd::abs_path("$PLUGIN_DIR/.."));
our $VENDOR = "$REPO/../shared/vendor/pve";

for my $need ('lib/PVE/Storage.pm', 'shim/PVEShim/CustomPlugins.pm') {
    next if -f "$VENDOR/$need";
    die "The proxmox-plugin tests run on the vendored Proxmox VE code, expected at "
        . "<repo>/../shared/vendor/pve, but $VENDOR/$need is missing. Put the shared "
        . "folder beside the repository.\n";
}
unshift @INC, "$VENDOR/shim", "$VENDOR/lib";

sub bin_dir {
    return untaint($ENV{TANDEM_BIN_DIR}) if $ENV{TANDEM_BIN_DIR};
    return untaint("$ENV{CARGO_TARGET_DIR}/debug") if $ENV{CARGO_TARGET_DIR};
    return "$REPO/target/debug";
}

sub bin {
    my ($name) = @_;
    my $path = bin_dir() . "/$name";
    die "$path not found; run `cargo build -p tandem-volume-driver --bins` first\n" if !-x $path;
    return $path;
}

our $SCRATCH_DIR = untaint(File::Temp::tempdir("tandem-pve-XXXXXX", TMPDIR => 1, CLEANUP => 1));

my $PLUGIN = 'PVE::Storage::Custom::TandemPlugin';

# The real PVE::Storage (and with it PVE::Storage::Plugin, SectionConfig, JSONSchema, ...).
sub load_pve {
    mkdir("$SCRATCH_DIR/etc-pve");
    $ENV{PVE_CLUSTER_SHIM_DIR} = "$SCRATCH_DIR/etc-pve";    # the shim's /etc/pve
    require PVEShim::CustomPlugins;
    return;
}

sub registered {
    return scalar(grep { $_ eq 'tandem' } @{ PVE::Storage::Plugin->lookup_types() });
}

# The plugin, registered by PVE::Storage's custom-plugin loader as on a PVE node, with test
# settings: CLI from the workspace, cache in the scratch dir.
sub plugin {
    load_pve();
    if (!registered()) {
        my @warnings = PVEShim::CustomPlugins::load($PLUGIN_DIR);
        die "PVE::Storage's plugin loader: @warnings" if @warnings;
        die "PVE::Storage's plugin loader did not register type 'tandem'\n" if !registered();
    }
    no warnings 'once';
    $PVE::Storage::Custom::TandemPlugin::CLI = bin_dir() . '/tandem';
    mkdir("$SCRATCH_DIR/cache");
    $PVE::Storage::Custom::TandemPlugin::CACHE_DIR = "$SCRATCH_DIR/cache";
    return $PLUGIN;
}

# What PVE::Storage's real loader does with the plugin when PVE's storage API is $apiver
# (APIAGE as vendored): runs it in a child process with the APIVER constant replaced.
# Returns { registered => 0|1, api => the plugin's api(), warnings => [...] }. Call it before
# plugin(): the child inherits this process, and a type registers only once.
sub loader_verdict {
    my ($apiver) = @_;
    load_pve();
    die "loader_verdict: the plugin is registered already (call it before plugin())\n"
        if registered();
    pipe(my $r, my $w) or die "pipe: $!";
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        close($r);
        my $result = eval {
            no warnings 'redefine';
            *PVE::Storage::APIVER = sub () { $apiver };
            my @warnings = PVEShim::CustomPlugins::load($PLUGIN_DIR);
            +{
                registered => registered() ? 1 : 0,
                warnings => \@warnings,
                api => $PLUGIN->can('api') ? $PLUGIN->api() : undef,
            };
        } // { error => "$@" };
        print {$w} JSON::PP->new->encode($result);
        close($w);
        POSIX::_exit(0);
    }
    close($w);
    my $json = do { local $/; <$r> };
    close($r);
    waitpid($pid, 0);
    my $result = JSON::PP->new->decode($json || '{"error":"no answer from the child"}');
    die "loader_verdict($apiver): $result->{error}" if $result->{error};
    return $result;
}

# Writes storage.cfg (the shim's /etc/pve) and returns PVE::Storage::config(): the real
# SectionConfig parser.
sub storage_cfg {
    my ($text) = @_;
    my $file = "$PVE::Cluster::BASE_DIR/storage.cfg";
    open(my $fh, '>', $file) or die "$file: $!";
    print {$fh} $text;
    close($fh) or die "$file: $!";
    return PVE::Storage::config();
}

# Run a command without a shell: (exit status, stdout, stderr).
sub run_cmd {
    my ($timeout, @cmd) = @_;
    return PVE::Storage::Custom::TandemPlugin::_run([map { untaint($_) } @cmd], $timeout);
}

sub wait_for {
    my ($seconds, $check) = @_;
    my $deadline = Time::HiRes::time() + $seconds;
    while (Time::HiRes::time() < $deadline) {
        return 1 if $check->();
        Time::HiRes::sleep(0.02);
    }
    return $check->();
}

my @DAEMONS;

END {
    my $status = $?;
    for my $d (@DAEMONS) {
        next if !$d->{pid};
        kill('CONT', $d->{pid});
        kill('KILL', $d->{pid});
        waitpid($d->{pid}, 0);
    }
    $? = $status;
}

# Start tandemd with file pools (default: one, `files`, in <root>/images); returns a hash
# with root, config, pid, nbd.
sub start_daemon {
    my (%opt) = @_;
    my @pools = @{ $opt{pools} // ['files'] };
    my $n = scalar(@DAEMONS);
    my $root = "$SCRATCH_DIR/node$n";
    mkdir($root) or die "mkdir $root: $!";
    my $config = "$root/tandem.toml";
    open(my $fh, '>', $config) or die "$config: $!";
    print {$fh} <<"TOML";
node = "hv1"
state_dir = "$root/state"
run_dir = "$root/run"
secret_file = "$root/secret"

[[nodes]]
name = "hv1"
control = "127.0.0.1:7700"
replication = "127.0.0.1:7788"
TOML
    for my $i (0 .. $#pools) {
        my $images = $i == 0 ? "$root/images" : "$root/images-$pools[$i]";
        print {$fh} qq(\n[[pools]]\nname = "$pools[$i]"\nbackend = "file"\npath = "$images"\n);
    }
    close($fh);
    my $daemon = { root => $root, config => $config, nbd => "$root/run/nbd.sock" };
    push @DAEMONS, $daemon;
    restart_daemon($daemon);
    return $daemon;
}

sub restart_daemon {
    my ($daemon) = @_;
    my $tandemd = bin('tandemd');
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        open(STDIN, '<', '/dev/null');
        open(STDOUT, '>', '/dev/null');
        open(STDERR, '>>', "$daemon->{root}/tandemd.log");
        exec($tandemd, '--config', $daemon->{config}) or POSIX::_exit(127);
    }
    $daemon->{pid} = $pid;
    my $ready = wait_for(10, sub {
        return 0 if waitpid($pid, POSIX::WNOHANG()) == $pid && ($daemon->{pid} = 0, 1);
        return IO::Socket::UNIX->new(Peer => "$daemon->{root}/run/tandemd.sock") ? 1 : 0;
    });
    die "tandemd did not start:\n" . daemon_log($daemon) if !$ready || !$daemon->{pid};
    return $daemon;
}

sub stop_daemon {
    my ($daemon) = @_;
    return if !$daemon->{pid};
    kill('CONT', $daemon->{pid});
    kill('KILL', $daemon->{pid});
    waitpid($daemon->{pid}, 0);
    $daemon->{pid} = 0;
}

sub daemon_log {
    my ($daemon) = @_;
    open(my $fh, '<', "$daemon->{root}/tandemd.log") or return '';
    local $/;
    return <$fh>;
}

# A fake `tandem` in its own directory: appends each argv (fields joined by \x1f) to
# <dir>/calls; prints <dir>/list.json for `volume list`, <dir>/status.json (if it exists)
# for `volume status`, <dir>/pools.json (if it exists) for `node info --pools`, else
# <dir>/out.json; prints
# <dir>/stderr on stderr; exits with the number in <dir>/exit; `exec sleep`s <dir>/sleep
# seconds first if that file exists.
sub fake_cli {
    my $dir = "$SCRATCH_DIR/fake" . int(rand(1e9));
    mkdir($dir) or die "mkdir $dir: $!";
    my $script = "$dir/tandem";
    open(my $fh, '>', $script) or die "$script: $!";
    print {$fh} <<"SH";
#!/bin/sh
d='$dir'
printf '%s\\037' "\$@" >> "\$d/calls"
printf '\\n' >> "\$d/calls"
if [ -f "\$d/sleep" ]; then exec sleep "\$(cat "\$d/sleep")"; fi
case " \$* " in
    *" volume list "*) [ -f "\$d/list.json" ] && cat "\$d/list.json" ;;
    *" volume status "*) if [ -f "\$d/status.json" ]; then cat "\$d/status.json"; else [ -f "\$d/out.json" ] && cat "\$d/out.json"; fi ;;
    *" node info --pools "*) if [ -f "\$d/pools.json" ]; then cat "\$d/pools.json"; else [ -f "\$d/out.json" ] && cat "\$d/out.json"; fi ;;
    *) [ -f "\$d/out.json" ] && cat "\$d/out.json" ;;
esac
[ -f "\$d/stderr" ] && cat "\$d/stderr" >&2
exit "\$(cat "\$d/exit" 2>/dev/null || echo 0)"
SH
    close($fh);
    chmod(0755, $script);
    return bless { dir => $dir, cli => $script }, 'TandemTest::Fake';
}

package TandemTest::Fake;

sub set {
    my ($self, $file, $content) = @_;
    my $path = "$self->{dir}/$file";
    if (!defined($content)) {
        unlink($path);
        return;
    }
    open(my $fh, '>', $path) or die "$path: $!";
    print {$fh} $content;
    close($fh);
}

# All recorded calls: a list of argv array refs (without the program name).
sub calls {
    my ($self) = @_;
    open(my $fh, '<', "$self->{dir}/calls") or return [];
    my @calls;
    while (my $line = <$fh>) {
        chomp($line);
        my @argv = split(/\x1f/, $line, -1);
        pop(@argv) if @argv && $argv[-1] eq '';
        push @calls, \@argv;
    }
    return \@calls;
}

sub reset {
    my ($self) = @_;
    unlink("$self->{dir}/$_")
        for qw(calls out.json list.json status.json pools.json stderr exit sleep);
}

1;
