#!/usr/bin/perl -T
# status() is what pvestatd polls: it must report the pool's bytes, reuse a recent answer
# of the same tandemd from its cache file, and return within its timeout when tandemd hangs
# (SIGSTOP) or is gone, with a clean message, never blocking. (45-pvestatd.t drives the
# whole cycle through PVE::Storage::storage_info.)

use strict;
use warnings;

use FindBin;
BEGIN { $FindBin::Bin =~ m/\A(.*)\z/s; unshift @INC, "$1/lib"; }

use File::Copy ();
use JSON::PP;
use Test::More;
use Time::HiRes ();
use TandemTest qw(plugin start_daemon run_cmd);

no warnings 'once';
my $P = plugin();
my $node = start_daemon();
my $scfg = { 'tandem-config' => $node->{config} };
$PVE::Storage::Custom::TandemPlugin::STATUS_TIMEOUT = 1;
$PVE::Storage::Custom::TandemPlugin::STATUS_TTL = 2;

sub timed {
    my ($code) = @_;
    my $t0 = Time::HiRes::time();
    my @result = eval { $code->() };
    return (Time::HiRes::time() - $t0, $@, @result);
}

my ($rc, $out) = run_cmd(10, TandemTest::bin('tandem'), '--config', $node->{config}, '--json',
    'pool', 'list');
is($rc, 0, 'tandem pool list');
my ($pool) = @{ decode_json($out) };

my ($took, $err, @status) = timed(sub { $P->status('tandem', $scfg, {}) });
is($err, '', 'status succeeds');
# A file pool reports its host filesystem, which other processes write to meanwhile: the
# total is exact, free and used may move a little between the two queries.
is($status[0], $pool->{total_bytes}, 'total bytes of the pool');
cmp_ok(abs($status[1] - $pool->{free_bytes}), '<', 256 << 20, "avail bytes ($status[1])");
cmp_ok(abs($status[2] - $pool->{used_bytes}), '<', 256 << 20, "used bytes ($status[2])");
is($status[3], 1, 'active');
is(scalar(@status), 4, '(total, avail, used, active)');
my @files = glob("$PVE::Storage::Custom::TandemPlugin::CACHE_DIR/status-*.json");
is(scalar(@files), 1, 'cache file written: one per tandemd');
like(do { local (@ARGV, $/) = @files; <> }, qr/"config":"\Q$node->{config}\E"/,
    '... naming its tandem-config');

kill('STOP', $node->{pid});
($took, $err, my @cached) = timed(sub { $P->status('tandem', $scfg, {}) });
is_deeply(\@cached, \@status, 'hung daemon, fresh cache: the cached answer');
cmp_ok($took, '<', 0.5, sprintf('... at once (%.2fs)', $took));

($took, $err, my @same) =
    timed(sub { $P->status('other', { %$scfg, 'tandem-pool' => 'files' }, {}) });
is_deeply(\@same, \@status, 'another storage of the same tandemd: the shared cached answer');
cmp_ok($took, '<', 0.5, sprintf('... at once (%.2fs)', $took));

# Another tandem-config is another tandemd as far as the cache knows (here: the same one).
my $other_config = "$node->{root}/other.toml";
File::Copy::copy($node->{config}, $other_config) or die "copy: $!";
($took, $err) = timed(sub { $P->status('other', { 'tandem-config' => $other_config }, {}) });
is($err, "tandem: 'tandem node info --pools' timed out after 1s (is tandemd hung?)\n",
    'a storage of another tandemd (no cache yet): clean timeout error');
cmp_ok($took, '<', 2.5, sprintf('... within the timeout (%.2fs)', $took));

sleep(2);    # the cache expires
($took, $err) = timed(sub { $P->status('tandem', $scfg, {}) });
is($err, "tandem: 'tandem node info --pools' timed out after 1s (is tandemd hung?)\n",
    'hung daemon, stale cache: clean timeout error');
cmp_ok($took, '<', 2.5, sprintf('... within the timeout (%.2fs)', $took));
($took, $err) = timed(sub { $P->status('tandem', $scfg, {}) });
like($err, qr/\Atandem: 'tandem node info --pools' timed out/, 'the failure is cached too');
cmp_ok($took, '<', 0.5, sprintf('... and answered at once (%.2fs)', $took));

kill('CONT', $node->{pid});
sleep(2);
($took, $err, @status) = timed(sub { $P->status('tandem', $scfg, {}) });
is($err, '', 'daemon resumed: status works again after the TTL');
is($status[3], 1, 'active');

($took, $err) = timed(sub { $P->status('tandem', { %$scfg, 'tandem-pool' => 'nvme' }, {}) });
is($err, "tandem: pool 'nvme' not found on this node\n",
    'a changed tandem-pool is looked up in the (cached) pool list, not reused');

TandemTest::stop_daemon($node);
sleep(2);
($took, $err) = timed(sub { $P->status('tandem', $scfg, {}) });
like($err, qr/\Atandem: cannot reach tandemd at \S+ \(is it running\?\)\n\z/, "daemon gone: $err");
cmp_ok($took, '<', 1.5, sprintf('... quickly (%.2fs)', $took));

{
    local $PVE::Storage::Custom::TandemPlugin::CACHE_DIR = '/proc/no-such-dir';
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, @_ };
    ($took, $err) = timed(sub { $P->status('tandem', $scfg, {}) });
    like($err, qr/\Atandem: cannot reach tandemd/, 'unwritable cache dir: still a clean answer');
    like(join('', @warnings), qr/\Atandem: cannot write status cache: /, '... and a warning');
}

done_testing();
