#!/usr/bin/perl -T
# pvestatd's status path, through the real PVE::Storage::storage_info as pvestatd calls it
# every 10 s (pve-manager PVE/Service/pvestatd.pm: `storage_info(config())` per cycle, in one
# long-lived process), on 3 tandem storages of one real tandemd. storage_info runs
# check_connection and activate_storage for every storage before its status.
#
# - the first cycle of the process (nothing cached): one `tandem node info` (the connection
#   check) and one `tandem node info --pools` (status);
# - healthy, the next 10 cycles: at most one CLI call per cycle for the tandemd, whatever the
#   number of storages: status's `node info --pools`, whose node info answers the next
#   cycle's connection checks;
# - tandemd hung (SIGSTOP): a cycle takes at most 2 s in total (one call timing out after
#   1.5 s), every storage reports inactive, the others from the cached failure;
# - tandemd resumed: the next cycle is back to one call, all active;
# - tandemd gone: the next cycle notices, all inactive.
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

# The CLI calls since the last look, as "node info", "node info --pools", ...
sub calls {
    open(my $in, '<', $log) or return [];
    my @calls = map { m/--json (.*)\z/ ? $1 : $_ } map { chomp; $_ } <$in>;
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

sub all_active {
    my ($what, $info, $warnings) = @_;
    is_deeply($warnings, [], "$what: no warnings");
    for my $storeid (sort keys %pool_of) {
        is($info->{$storeid}->{active}, 1, "$what: $storeid active");
        is($info->{$storeid}->{total}, $total{ $pool_of{$storeid} },
            "$what: $storeid total = its pool's");
    }
}

my $HUNG = "tandem: 'tandem node info --pools' timed out after 1.5s (is tandemd hung?)\n";
# (PVE::Storage::activate_storage appends "\n" to the plugin's one-line message.)
sub check_failed { return "connection check for storage '$_[0]' failed - $_[1]\n" }

subtest "pvestatd's first cycle: nothing cached yet" => sub {
    my ($info, $took, $warnings, $calls) = cycle();
    is_deeply($calls, ['node info', 'node info --pools'],
        'the connection check, then status (with the pools)');
    all_active('first cycle', $info, $warnings);
    note(sprintf('first cycle took %.2fs', $took));
};

subtest 'healthy: at most one CLI call per cycle for 3 storages' => sub {
    for my $n (1 .. 10) {
        my ($info, $took, $warnings, $calls) = cycle();
        cmp_ok(scalar(@$calls), '<=', 1, "cycle $n: at most one CLI call");
        is_deeply($calls, ['node info --pools'], "cycle $n: status's, which also answers the "
            . "next cycle's connection checks");
        all_active("cycle $n", $info, $warnings);
        note(sprintf('cycle %d took %.2fs', $n, $took));
    }
};

subtest 'tandemd hung: at most 2 s per cycle, inactive from the cached failure' => sub {
    kill('STOP', $node->{pid});
    for my $n (1 .. 5) {
        my ($info, $took, $warnings, $calls) = cycle();
        cmp_ok($took, '<=', 2, sprintf('hung cycle %d took %.2fs', $n, $took));
        is_deeply($calls, ['node info --pools'], "hung cycle $n: one CLI call, for all 3 storages");
        for my $storeid (sort keys %pool_of) {
            is($info->{$storeid}->{active}, 0, "hung cycle $n: $storeid inactive");
        }
        # The reason, for each storage (pvestatd logs it). In the first hung cycle the first
        # storage passed its check on the previous cycle's answer and its status timed out
        # (PVE logs that without the storage's name); the failure then failed the other checks.
        # From then on the connection check fails, and retries once per cycle.
        my @checks = map { check_failed($_, $HUNG) } sort keys %pool_of;
        if ($n == 1) {
            my @failed = grep { $_ ne $HUNG } @$warnings;
            is(scalar(@$warnings) - scalar(@failed), 1, 'hung cycle 1: one status failure');
            is(scalar(@failed), 2, '... and two failed connection checks');
            is_deeply([grep { my $w = $_; !grep { $_ eq $w } @checks } @failed], [],
                '... with the reason');
        } else {
            is_deeply([sort @$warnings], \@checks, "hung cycle $n: the failed connection checks");
        }
    }
    kill('CONT', $node->{pid});
};

subtest 'tandemd resumed: the next cycle is back to one call' => sub {
    for my $n (1 .. 2) {
        my ($info, $took, $warnings, $calls) = cycle();
        is_deeply($calls, ['node info --pools'],
            "cycle $n: one call, for the connection check and status");
        all_active("resumed cycle $n", $info, $warnings);
    }
};

subtest 'tandemd gone: the next cycle notices' => sub {
    TandemTest::stop_daemon($node);
    my ($info, $took, $warnings, $calls) = cycle();
    is_deeply($calls, ['node info --pools'], 'one call');
    is(scalar(grep { $info->{$_}->{active} } sort keys %pool_of), 0, 'all 3 storages inactive');
    is(scalar(@$warnings), 3, '... each with the reason');
    cmp_ok($took, '<=', 2, sprintf('cycle took %.2fs', $took));
};

done_testing();
