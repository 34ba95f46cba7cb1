#!/usr/bin/perl -T
# Snapshots, templates and linked clones (`qm snapshot|rollback|delsnapshot|template|clone`):
# the exact argv each method gives `tandem` (recorded by a fake CLI), with the argument
# shapes PVE's callers use, PVE's base-<vmid>-disk-N naming, the free-name search of
# clone_image, and the errors: invalid names refused before the CLI runs, the CLI's
# one-line message passed through unchanged.

use strict;
use warnings;

use FindBin;
BEGIN { $FindBin::Bin =~ m/\A(.*)\z/s; unshift @INC, "$1/lib"; }

use Test::More;
use TandemTest qw(plugin fake_cli);

my $P = plugin();
my $fake = fake_cli();
{
    no warnings 'once';
    $PVE::Storage::Custom::TandemPlugin::CLI = $fake->{cli};
}
my $SNAP = '{"volume":"vm-100-disk-0","name":"pre-upgrade","nodes":["hv1","hv2"],"pause_ms":12}';
my $LIST = '[{"volume":"vm-100-disk-0","name":"a","nodes":["hv1","hv2"]},'
    . '{"volume":"vm-100-disk-0","name":"b","nodes":["hv1"]}]';

sub last_call { my $calls = $fake->calls; return $calls->[-1] }

subtest 'volume_snapshot, _rollback, _delete: argv' => sub {
    $fake->reset;
    $fake->set('out.json', $SNAP);
    # PVE::Storage::volume_snapshot($cfg, $volid, $snap) -> ($scfg, $storeid, $volname, $snap)
    is($P->volume_snapshot({}, 'store', 'vm-100-disk-0', 'pre-upgrade'), undef, 'snapshot');
    is_deeply(last_call(), ['--json', 'snapshot', 'create', 'vm-100-disk-0', 'pre-upgrade'],
        'snapshot create VOLUME SNAP');
    $P->volume_snapshot_rollback({ 'tandem-config' => '/etc/tandem/o.toml' }, 'store',
        'vm-100-disk-0', 'pre-upgrade');
    is_deeply(last_call(), ['--config', '/etc/tandem/o.toml', '--json', 'snapshot', 'rollback',
        'vm-100-disk-0', 'pre-upgrade'], 'snapshot rollback, with the storage\'s config');
    $P->volume_snapshot_delete({}, 'store', 'vm-100-disk-0', 'pre-upgrade', 0);
    is_deeply(last_call(), ['--json', 'snapshot', 'delete', 'vm-100-disk-0', 'pre-upgrade'],
        'snapshot delete');
    $P->volume_snapshot({}, 'store', 'base-9-disk-1', 's_1.x');
    is_deeply(last_call(), ['--json', 'snapshot', 'create', 'base-9-disk-1', 's_1.x'],
        'a base volume can have snapshots too');
};

subtest 'volume_snapshot_info and volume_rollback_is_possible read the list' => sub {
    $fake->reset;
    $fake->set('out.json', $LIST);
    is_deeply($P->volume_snapshot_info({}, 'store', 'vm-100-disk-0'), {
        a => { name => 'a', nodes => ['hv1', 'hv2'] },
        b => { name => 'b', nodes => ['hv1'] },
    }, 'info: one entry per snapshot, with its nodes');
    is_deeply(last_call(), ['--json', 'snapshot', 'list', 'vm-100-disk-0'], 'snapshot list');
    is($P->volume_rollback_is_possible({}, 'store', 'vm-100-disk-0', 'a', []), 1,
        'rollback to an older snapshot is possible (thin snapshots and reflinks keep them all)');
    eval { $P->volume_rollback_is_possible({}, 'store', 'vm-100-disk-0', 'zz', []) };
    is($@, "tandem: snapshot 'zz' of 'vm-100-disk-0' does not exist\n", 'a missing snapshot');
    $fake->set('out.json', '[]');
    is_deeply($P->volume_snapshot_info({}, 'store', 'vm-100-disk-0'), {}, 'no snapshots');
    $fake->set('out.json', '{"not":"a list"}');
    eval { $P->volume_snapshot_info({}, 'store', 'vm-100-disk-0') };
    is($@, "tandem: 'tandem snapshot list vm-100-disk-0' did not return a list\n", 'garbage');
};

subtest 'create_base: vm-<vmid>-disk-N becomes a read-only base-<vmid>-disk-N' => sub {
    $fake->reset;
    $fake->set('out.json', '[]');
    is($P->create_base('store', {}, 'vm-100-disk-3'), 'base-100-disk-3', 'new volume name');
    is_deeply($fake->calls, [
        ['--json', 'snapshot', 'list', 'vm-100-disk-3'],
        ['--json', 'volume', 'rename', 'vm-100-disk-3', 'base-100-disk-3'],
        ['--json', 'volume', 'set', 'base-100-disk-3', '--read-only'],
    ], 'argv: no snapshots, rename, then read-only');
    $fake->reset;
    $fake->set('out.json', $LIST);
    eval { $P->create_base('store', {}, 'vm-100-disk-0') };
    is($@, "tandem: unable to create base volume - 'vm-100-disk-0' has snapshots (a, b); "
        . "delete them first\n", 'refused with snapshots, as on LVM-thin');
    is(scalar(@{ $fake->calls }), 1, 'nothing but the list ran');
    $fake->reset;
    eval { $P->create_base('store', {}, 'base-100-disk-0') };
    is($@, "tandem: create_base not possible with base image\n", 'a base stays a base');
    is_deeply($fake->calls, [], 'the CLI was never run');
};

subtest 'clone_image: from a base or a snapshot, as the next free vm-<vmid>-disk-N' => sub {
    $fake->reset;
    $fake->set('list.json', '[{"name":"vm-101-disk-0"},{"name":"base-100-disk-0"}]');
    $fake->set('out.json', '{"name":"vm-101-disk-1"}');
    # PVE::Storage::vdisk_clone -> ($scfg, $storeid, $volname, $vmid, $snap)
    is($P->clone_image({}, 'store', 'base-100-disk-0', 101, undef), 'vm-101-disk-1',
        'linked clone of a template');
    is_deeply($fake->calls, [
        ['--json', 'volume', 'list'],
        ['--json', 'volume', 'clone', 'base-100-disk-0', 'vm-101-disk-1'],
    ], 'argv: list for a free name, then clone ORIGIN NEW');
    $fake->reset;
    $fake->set('list.json', '[]');
    $fake->set('out.json', '{"name":"vm-102-disk-0"}');
    is($P->clone_image({}, 'store', 'vm-100-disk-0', 102, 'pre-upgrade'), 'vm-102-disk-0',
        'linked clone of a snapshot');
    is_deeply(last_call(), ['--json', 'volume', 'clone', 'vm-100-disk-0@pre-upgrade',
        'vm-102-disk-0'], 'origin VOLUME@SNAPSHOT');
    $fake->reset;
    eval { $P->clone_image({}, 'store', 'vm-100-disk-0', 102, undef) };
    is($@, "tandem: clone_image only works on base images\n", 'a plain volume needs a snapshot');
    eval { $P->clone_image({}, 'store', 'base-100-disk-0', 'x1', undef) };
    is($@, "tandem: invalid VMID 'x1'\n", 'bad VMID');
    is_deeply($fake->calls, [], 'the CLI was never run');
};

subtest 'errors: bad names before the CLI, the CLI\'s one line passed through' => sub {
    $fake->reset;
    for my $snap ('', 'a b', '../x', 'a;rm -rf', '-x', 'x' x 65) {
        for my $call (
            sub { $P->volume_snapshot({}, 'store', 'vm-100-disk-0', $snap) },
            sub { $P->volume_snapshot_rollback({}, 'store', 'vm-100-disk-0', $snap) },
            sub { $P->volume_snapshot_delete({}, 'store', 'vm-100-disk-0', $snap, 0) },
            sub { $P->clone_image({}, 'store', 'vm-100-disk-0', 5, $snap eq '' ? '-' : $snap) },
        ) {
            eval { $call->() };
            like($@, qr/\Atandem: invalid snapshot name '[^\n]*'\n\z/, "refused '$snap'");
        }
    }
    eval { $P->volume_snapshot({}, 'store', 'vm-1;x', 'a') };
    like($@, qr/\Atandem: unable to parse volume name/, 'bad volume name');
    is_deeply($fake->calls, [], 'the CLI was never run');

    for my $case (
        ['volume_snapshot', "tandem: cannot snapshot 'vm-100-disk-0' (nothing changed): node "
            . "'hv2' (10.0.0.2:7700): cannot connect: Connection refused (is tandemd running "
            . "there?)"],
        ['volume_snapshot', "tandem: pool files's filesystem has no reflink; snapshots need XFS "
            . "with reflink=1 or btrfs"],
        ['volume_snapshot_rollback', "tandem: cannot roll 'vm-100-disk-0' back (nothing "
            . "changed): vm-100-disk-0 is in use on hv1 (open by 1 writer(s)); stop the VM first"],
        ['volume_snapshot_delete', "tandem: snapshot 'vm-100-disk-0\@a' is the base of linked "
            . "clone(s) vm-101-disk-0; delete them first"],
    ) {
        my ($method, $message) = @$case;
        $fake->reset;
        $fake->set('stderr', "$message\n");
        $fake->set('exit', 1);
        eval { $P->$method({}, 'store', 'vm-100-disk-0', 'a', 0) };
        is($@, "$message\n", "$method: the CLI's line, unchanged");
    }
    $fake->reset;
    $fake->set('stderr', "tandem: volume 'base-100-disk-0' is the base of linked clone(s) "
        . "vm-101-disk-0; delete them first\n");
    $fake->set('exit', 1);
    eval { $P->free_image('store', {}, 'base-100-disk-0', 1, 'raw') };
    is($@, "tandem: volume 'base-100-disk-0' is the base of linked clone(s) vm-101-disk-0; "
        . "delete them first\n", 'free_image of a base with clones: refused, naming them');
    $fake->reset;
};

done_testing();
