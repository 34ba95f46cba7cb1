#!/usr/bin/perl -T
# pvestatd's status path, through the real PVE::Storage::storage_info as pvestatd calls it
# every 10 s (pve-manager PVE/Service/pvestatd.pm: `storage_info(config())` per cycle, in one
# long-lived process), on 3 tandem storages of one real tandemd. storage_info runs
# check_connection and activate_storage for every storage before its status.
#
# - healthy, 10 cycles: each cycle runs exactly one `tandem node info` and one
#   `tandem pool list` for the tandemd, whatever the number of storages;
# - tandemd hung (SIGSTOP): a cycle takes at most 2 s in total (one `node info` timing out
#   after $CHECK_TIMEOUT), every storage reports inactive, the others from the cached failure;
# - tandemd resumed: the next cycle is back to normal.
#
# The CLI is the real `tandem` behind a wrapper that logs each argv. The plugin's clock is
# moved on by pvestatd's 10 s between cycles, so the test does not wait for them.

use strict;
use warnings;

use FindBin;
BEGIN { $FindBin::Bin =~ m/\A(.*)\z/s; unshift @INC, "$1/lib"; }

use JSON::PP;
use Test::More;
use Time::HiRes ();
use TandemTest qw(plugin start_daemon storage_cfg run_cmd);

no warnings 'once';
my $P = plugin();
my %pool_of = ('tandem-a' => 'files', 'tandem-b' => 'files2', 'tandem-c' => 'files3');
my $node = start_daemon(pools => [map { $pool_of{$_} } sort keys %pool_of]);

# The real CLI, logging "ARGS..." per call.
my $log = "$TandemTest::SCRATCH_DIR/cli.log";
my $wrapper = "$TandemTest::SCRATCH_DIR/tandem-logged";
open(my $fh, '>', $wrapper) or die "$wrapper: $!";
print {$fh} "#!/bin/sh\nprintf '%s\\n' \"\$*\" >> '$log'\nexec '" . TandemTest::bin('tandem')
    . "' \"\$@\"\n";
close($fh);
chmod(0755, $wrapper) or die "chmod: $!";
$PVE::Storage::Custom::TandemPlugin::CLI = $wrapper;

# The CLI calls since the last look, as "node info", "pool list", ...
sub calls {
    open(my $in, '<', $log) or return [];
    my @calls = map { m/--json (\S+ \S+)/ ? $1 : $_ } map { chomp; $_ } <$in>;
    close($in);
    unlink($log);
    return \@calls;
}

storage_cfg(join("\n", map { <<"CFG" } sort keys %pool_of));
tandem: $_
	content images
	shared 1
	tandem-pool $pool_of{$_}
	tandem-config $node->{config}
CFG

my ($rc, $out) = run_cmd(10, TandemTest::bin('tandem'), '--config', $node->{config}, '--json',
    'pool', 'list');
is($rc, 0, 'tandem pool list');
my %total = map { $_->{name} => $_->{total_bytes} } @{ decode_json($out) };

# The plugin's clock: real time plus the pvestatd intervals skipped.
my $real_time = \&Time::HiRes::time;
my $skipped = 0;
{
    no warnings 'redefine';
    *Time::HiRes::time = sub () { return $real_time->() + $skipped };
}

# One pvestatd cycle: (storage_info's answer, seconds it took, warnings, CLI calls).
sub cycle {
    $skipped += 10;    # pvestatd's $updatetime
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, $_[0] };
    my $t0 = $real_time->();
    my $info = PVE::Storage::storage_info(PVE::Storage::config());
    return ($info, $real_time->() - $t0, \@warnings, calls());
}

subtest 'healthy: one node info and one pool list per cycle for 3 storages' => sub {
    for my $n (1 .. 10) {
        my ($info, $took, $warnings, $calls) = cycle();
        is_deeply($calls, ['node info', 'pool list'], "cycle $n: CLI calls");
        is_deeply($warnings, [], "cycle $n: no warnings");
        for my $storeid (sort keys %pool_of) {
            is($info->{$storeid}->{active}, 1, "cycle $n: $storeid active");
            is($info->{$storeid}->{total}, $total{ $pool_of{$storeid} },
                "cycle $n: $storeid total = its pool's");
        }
        note(sprintf('cycle %d took %.2fs', $n, $took));
    }
};

subtest 'tandemd hung: at most 2 s per cycle, inactive from the cached failure' => sub {
    kill('STOP', $node->{pid});
    for my $n (1 .. 5) {
        my ($info, $took, $warnings, $calls) = cycle();
        cmp_ok($took, '<=', 2, sprintf('hung cycle %d took %.2fs', $n, $took));
        is_deeply($calls, ['node info'], "hung cycle $n: one CLI call, for all 3 storages");
        for my $storeid (sort keys %pool_of) {
            is($info->{$storeid}->{active}, 0, "hung cycle $n: $storeid inactive");
        }
        # (PVE::Storage::activate_storage appends "\n" to the plugin's one-line message.)
        is_deeply([sort @$warnings], [map {
            "connection check for storage '$_' failed - tandem: 'tandem node info' timed out "
                . "after 1.5s (is tandemd hung?)\n\n" } sort keys %pool_of],
            "hung cycle $n: the reason, for each storage (pvestatd logs it)");
    }
    kill('CONT', $node->{pid});
};

subtest 'tandemd resumed: the next cycle is normal' => sub {
    for my $n (1 .. 2) {
        my ($info, $took, $warnings, $calls) = cycle();
        is_deeply($calls, ['node info', 'pool list'], "cycle $n: CLI calls");
        is_deeply($warnings, [], "cycle $n: no warnings");
        is(scalar(grep { $info->{$_}->{active} } sort keys %pool_of), 3,
            "cycle $n: all 3 storages active");
    }
};

done_testing();
