#!/usr/bin/perl -T
# The plugin's side of the PVE storage contract that needs no daemon: loader checks and the
# API version window, type/plugindata/properties/options, volume names, features, the
# clean "not supported yet" errors, and the blockdev dict against PVE's allow-list.

use strict;
use warnings;

use FindBin;
BEGIN { $FindBin::Bin =~ m/\A(.*)\z/s; unshift @INC, "$1/lib"; }

use Test::More;
use TandemTest qw(plugin);

my $P = plugin();
ok(${^TAINT}, "runs under taint mode, like PVE's daemons");
no warnings 'once';

subtest 'loader and api window' => sub {
    for my $case ([15, 15, 'load'], [12, 12, 'load'], [10, 10, 'load'], [16, 15, 'load-warn'],
        [21, 15, 'load-warn'], [22, 15, 'skip'], [9, 15, 'skip'])
    {
        my ($running, $want, $decision) = @$case;
        local $PVE::Storage::TEST_APIVER = $running;
        is($P->api(), $want, "APIVER $running: api() = $want");
        my ($got) = PVE::Storage::check_custom_plugin($P);
        is($got, $decision, "APIVER $running (AGE 6): loader says $decision");
    }
};

subtest 'type, plugindata, properties, options' => sub {
    is($P->type(), 'tandem', 'type');
    my $data = $P->plugindata();
    is_deeply($data->{content}, [{ images => 1 }, { images => 1 }], 'content: images');
    is_deeply($P->get_formats(), { default => 'raw', valid => { raw => 1 } }, 'formats: raw');
    my $props = $P->properties();
    is_deeply([PVE::JSONSchema::check_properties($props)], [], 'properties are valid schema');
    ok(!grep({ !m/\Atandem-/ } keys %$props), 'every property is prefixed tandem-');
    for my $name (qw(tandem-config tandem-pool tandem-replicas tandem-protocol tandem-nodes
        tandem-socket tandem-reconnect-delay))
    {
        ok($props->{$name}, "property $name exists");
    }
    is(PVE::JSONSchema::check_value($props->{'tandem-protocol'}, 'C'), undef, 'protocol C ok');
    ok(PVE::JSONSchema::check_value($props->{'tandem-protocol'}, 'D'), 'protocol D refused');
    ok(PVE::JSONSchema::check_value($props->{'tandem-replicas'}, 0), 'replicas 0 refused');
    is(PVE::JSONSchema::check_value($props->{'tandem-nodes'}, 'hv1,hv2'), undef, 'nodes list ok');
    ok(PVE::JSONSchema::check_value($props->{'tandem-nodes'}, 'hv1;hv2'), 'bad nodes list refused');
    my $options = $P->options();
    for my $name (keys %$props, qw(shared nodes disable content)) {
        ok($options->{$name} && $options->{$name}{optional}, "option $name is optional");
    }
};

subtest 'parse_volname' => sub {
    is_deeply([$P->parse_volname('vm-100-disk-0')],
        ['images', 'vm-100-disk-0', 100, undef, undef, 0, 'raw'], 'vm disk');
    is_deeply([$P->parse_volname('base-9001-disk-1')],
        ['images', 'base-9001-disk-1', 9001, undef, undef, 1, 'raw'], 'base disk');
    is(($P->parse_volname('vm-7-cloudinit'))[2], 7, 'cloudinit disk');
    for my $bad ('', 'disk-0', 'vm-x-disk-0', 'vm-100-', 'vm-100-disk-0/../x',
        'vm-100-disk 0', 'vm-100-' . ('a' x 60))
    {
        eval { $P->parse_volname($bad) };
        like($@, qr/\Atandem: unable to parse volume name '\Q$bad\E'.*\n\z/, "refused '$bad'");
    }
};

subtest 'features' => sub {
    my $scfg = {};
    ok($P->volume_has_feature($scfg, 'copy', 's', 'vm-1-disk-0', undef, 0), 'copy current');
    ok($P->volume_has_feature($scfg, 'sparseinit', 's', 'vm-1-disk-0'), 'sparseinit');
    for my $feature (qw(snapshot clone template)) {
        ok(!$P->volume_has_feature($scfg, $feature, 's', 'vm-1-disk-0', undef, 0),
            "no $feature");
    }
    ok($P->volume_has_feature($scfg, 'rename', 's', 'vm-1-disk-0', undef, 0), 'rename current');
    ok(!$P->volume_has_feature($scfg, 'rename', 's', 'vm-1-disk-0', 'snap1', 0), 'no rename of snap');
    ok(!$P->volume_has_feature($scfg, 'rename', 's', 'base-1-disk-0', undef, 0), 'no rename of base');
    ok(!$P->volume_has_feature($scfg, 'copy', 's', 'vm-1-disk-0', 'snap1', 0), 'no copy of snap');
    ok(!$P->volume_has_feature($scfg, 'copy', 's', 'base-1-disk-0', undef, 0), 'no copy of base');
};

subtest 'not supported yet: clean one-line errors' => sub {
    my $scfg = { 'tandem-socket' => '/run/tandem/nbd.sock' };
    my %calls = (
        volume_snapshot => sub { $P->volume_snapshot($scfg, 's', 'vm-1-disk-0', 'a') },
        volume_snapshot_rollback =>
            sub { $P->volume_snapshot_rollback($scfg, 's', 'vm-1-disk-0', 'a') },
        volume_snapshot_delete =>
            sub { $P->volume_snapshot_delete($scfg, 's', 'vm-1-disk-0', 'a', 0) },
        volume_rollback_is_possible =>
            sub { $P->volume_rollback_is_possible($scfg, 's', 'vm-1-disk-0', 'a', []) },
        create_base => sub { $P->create_base('s', $scfg, 'vm-1-disk-0') },
        clone_image => sub { $P->clone_image($scfg, 's', 'vm-1-disk-0', 2, undef) },
        map_volume => sub { $P->map_volume('s', $scfg, 'vm-1-disk-0') },
        path_of_snapshot => sub { $P->path($scfg, 'vm-1-disk-0', 's', 'snap') },
        resize_snapshot => sub { $P->volume_resize($scfg, 's', 'vm-1-disk-0', 1 << 30, 0, 'a') },
        activate_snapshot => sub { $P->activate_volume('s', $scfg, 'vm-1-disk-0', 'snap') },
        blockdev_snapshot => sub {
            $P->qemu_blockdev_options($scfg, 's', 'vm-1-disk-0', '10.0', { 'snapshot-name' => 'a' })
        },
    );
    for my $name (sort keys %calls) {
        eval { $calls{$name}->() };
        like($@, qr/\Atandem: [^\n]* not supported yet\n\z/, "$name dies cleanly");
    }
    eval { $P->rename_volume($scfg, 's', 'base-1-disk-0', 2, undef) };
    is($@, "tandem: renaming a base volume (template) is not supported\n", 'no rename of a base');
    is_deeply([$P->volume_export_formats($scfg, 's', 'vm-1-disk-0')], [], 'no export formats');
};

subtest 'path and qemu_blockdev_options with tandem-socket (no daemon call)' => sub {
    my $scfg = { 'tandem-socket' => '/run/tandem/nbd.sock' };
    my $path = $P->path($scfg, 'vm-100-disk-0', 's');
    is($path, 'nbd:unix:/run/tandem/nbd.sock:exportname=vm-100-disk-0', 'path (scalar)');
    is_deeply([$P->path($scfg, 'vm-100-disk-0', 's')], [$path, 100, 'images'], 'path (list)');
    is(scalar($P->filesystem_path($scfg, 'vm-100-disk-0')), $path, 'filesystem_path');
    my $opts = $P->qemu_blockdev_options($scfg, 's', 'vm-100-disk-0', '10.0', {});
    is_deeply($opts, {
        driver => 'nbd',
        server => { type => 'unix', path => '/run/tandem/nbd.sock' },
        export => 'vm-100-disk-0',
        'reconnect-delay' => 10,
    }, 'blockdev dict');
    is_deeply(PVE::Storage::check_blockdev_options($opts), [], 'every key passes the allow-list');
    like(JSON::PP->new->canonical->encode($opts), qr/"reconnect-delay":10\b/, 'delay is a JSON int');
    $scfg->{'tandem-reconnect-delay'} = '30';
    like(JSON::PP->new->encode($P->qemu_blockdev_options($scfg, 's', 'vm-100-disk-0')),
        qr/"reconnect-delay":30\b/, 'configured delay, as a JSON number');
    eval { $P->path({ 'tandem-socket' => '/run/a:b.sock' }, 'vm-100-disk-0', 's') };
    like($@, qr/\Atandem: NBD socket path .* must not contain ':'\n\z/, 'colon refused');
};

done_testing();
