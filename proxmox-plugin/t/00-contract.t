#!/usr/bin/perl -T
# The plugin's side of the PVE storage contract that needs no daemon, against the real
# pve-storage code: PVE::Storage's custom-plugin loader and the API version window,
# type/plugindata/properties/options through SectionConfig and JSONSchema, volume names,
# features (the LvmThinPlugin table), the clean "not supported yet" errors, and the
# blockdev dict through PVE::Storage::qemu_blockdev_options (its allow-list).

use strict;
use warnings;

use FindBin;
BEGIN { $FindBin::Bin =~ m/\A(.*)\z/s; unshift @INC, "$1/lib"; }

use JSON::PP;
use Test::More;
use TandemTest qw(plugin loader_verdict storage_cfg);

# [running APIVER, api() the plugin reports, what the loader does] (APIAGE 6, as vendored).
my @WINDOW = ([15, 15, 'load'], [12, 12, 'load'], [10, 10, 'load'], [16, 15, 'load-warn'],
    [21, 15, 'load-warn'], [22, 15, 'skip'], [9, 15, 'skip']);
# Each in a child process, before this process registers the plugin.
my %verdict = map { $_->[0] => loader_verdict($_->[0]) } @WINDOW;

my $P = plugin();
ok(${^TAINT}, "runs under taint mode, like PVE's daemons");
no warnings 'once';

subtest 'loaded by the real PVE::Storage' => sub {
    like($INC{'PVE/Storage.pm'}, qr{/shared/vendor/pve/lib/PVE/Storage\.pm\z},
        'PVE::Storage is the vendored upstream one');
    like($INC{'PVE/Storage/Plugin.pm'}, qr{/shared/vendor/pve/lib/}, 'so is PVE::Storage::Plugin');
    like($INC{'PVE/Cluster.pm'}, qr{/shared/vendor/pve/shim/}, 'PVE::Cluster is the shim');
    is(PVE::Storage::Plugin->lookup('tandem'), $P, "the loader registered type 'tandem'");
    my $apiver = PVE::Storage::APIVER();
    is($P->api(), $apiver, "api() = the running APIVER ($apiver)");
};

subtest "PVE::Storage's loader and the api window" => sub {
    for my $case (@WINDOW) {
        my ($running, $want, $decision) = @$case;
        my $v = $verdict{$running};
        is($v->{api}, $want, "APIVER $running: api() = $want");
        my $warnings = join('', @{ $v->{warnings} });
        if ($decision eq 'skip') {
            ok(!$v->{registered}, "APIVER $running: not loaded");
            like($warnings, qr/\AError loading storage plugin "\Q$P\E": .*API version/,
                "APIVER $running: the loader says why");
        } else {
            ok($v->{registered}, "APIVER $running: loaded");
            if ($decision eq 'load') {
                is($warnings, '', "APIVER $running: without a warning");
            } else {
                like($warnings, qr/implementing an older storage API/,
                    "APIVER $running: with the loader's upgrade warning");
            }
        }
    }
};

# The error JSONSchema gives for one property's value, as `pvesm add` validates it.
sub schema_error {
    my ($name, $value) = @_;
    my $schema = PVE::Storage::Plugin->createSchema()->{properties}->{$name}
        // die "createSchema has no $name\n";
    eval {
        PVE::JSONSchema::validate({ $name => $value },
            { type => 'object', properties => { $name => $schema } });
    };
    return undef if !$@;
    return ref($@) ? ($@->{errors}->{$name} // "$@") : $@;
}

subtest 'type, plugindata, properties, options' => sub {
    is($P->type(), 'tandem', 'type');
    my $data = $P->plugindata();
    is_deeply($data->{content}, [{ images => 1 }, { images => 1 }], 'content: images');
    is_deeply($P->get_formats({ type => 'tandem' }, 's'),
        { default => 'raw', valid => { raw => 1 } }, 'formats: raw (the inherited get_formats)');
    my $props = $P->properties();
    for my $schema (PVE::Storage::Plugin->createSchema(), PVE::Storage::Plugin->updateSchema()) {
        eval { PVE::JSONSchema::validate_schema($schema) };
        is($@, '', 'the API schema with our properties passes the JSON meta-schema');
    }
    ok(!grep({ !$props->{$_}->{description} } keys %$props), 'every property has a description');
    for my $name (grep { defined($props->{$_}->{default}) } sort keys %$props) {
        is(schema_error($name, $props->{$name}->{default}), undef, "default of $name is valid");
    }
    ok(!grep({ !m/\Atandem-/ } keys %$props), 'every property is prefixed tandem-');
    for my $name (qw(tandem-config tandem-pool tandem-replicas tandem-protocol tandem-nodes
        tandem-socket tandem-reconnect-delay))
    {
        ok($props->{$name}, "property $name exists");
    }
    is(schema_error('tandem-protocol', 'C'), undef, 'protocol C ok');
    like(schema_error('tandem-protocol', 'D'), qr/enumeration/, 'protocol D refused');
    like(schema_error('tandem-replicas', 0), qr/minimum/, 'replicas 0 refused');
    is(schema_error('tandem-nodes', 'hv1,hv2'), undef, 'nodes list ok');
    like(schema_error('tandem-nodes', 'hv1;hv2'), qr/pattern/, 'bad nodes list refused');
    my $options = $P->options();
    for my $name (keys %$props, qw(shared nodes disable content)) {
        ok($options->{$name} && $options->{$name}{optional}, "option $name is optional");
    }
};

subtest 'storage.cfg through the real SectionConfig' => sub {
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, $_[0] };
    my $cfg = PVE::Storage::Plugin->parse_config('storage.cfg', <<'CFG');
tandem: good
	content images
	shared 1
	tandem-pool nvme
	tandem-replicas 2
	tandem-protocol C
	tandem-nodes hv1,hv2
CFG
    is_deeply(\@warnings, [], 'no warnings');
    is_deeply($cfg->{ids}->{good}, { type => 'tandem', content => { images => 1 }, shared => 1,
        'tandem-pool' => 'nvme', 'tandem-replicas' => 2, 'tandem-protocol' => 'C',
        'tandem-nodes' => 'hv1,hv2' }, 'a tandem section');
    $cfg = PVE::Storage::Plugin->parse_config('storage.cfg', <<'CFG');
tandem: bad
	content images
	tandem-protocol D
	tandem-bogus 1
	path /var/lib/vz
CFG
    my %err = map { $_->{key} => $_->{err} } @{ $cfg->{errors} // [] };
    like($err{'tandem-protocol'}, qr/enumeration/, 'bad value refused');
    like($err{'tandem-bogus'}, qr/unknown property type/, 'unknown property refused');
    like($err{path}, qr/unexpected property 'path'/, "another type's property refused");
    is_deeply([sort keys %{ $cfg->{ids}->{bad} }], ['content', 'type'], 'only valid keys kept');
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

subtest 'features: the LvmThinPlugin table, without copies of snapshots' => sub {
    my $scfg = {};
    my %want = (
        snapshot   => { current => 1, base => 0, snap => 0 },
        clone      => { current => 0, base => 1, snap => 1 },
        template   => { current => 1, base => 0, snap => 0 },
        copy       => { current => 1, base => 1, snap => 0 },
        sparseinit => { current => 1, base => 1, snap => 0 },
        rename     => { current => 1, base => 0, snap => 0 },
        nonsense   => { current => 0, base => 0, snap => 0 },
    );
    my %volume = (current => ['vm-1-disk-0', undef], base => ['base-1-disk-0', undef],
        snap => ['vm-1-disk-0', 'snap1']);
    for my $feature (sort keys %want) {
        for my $key (qw(current base snap)) {
            my ($volname, $snap) = @{ $volume{$key} };
            is(!!$P->volume_has_feature($scfg, $feature, 's', $volname, $snap, 0),
                !!$want{$feature}{$key}, "$feature on $key");
        }
    }
};

subtest 'not supported yet: clean one-line errors' => sub {
    my $scfg = { 'tandem-socket' => '/run/tandem/nbd.sock' };
    my %calls = (
        rename_snapshot => sub { $P->rename_snapshot($scfg, 's', 'vm-1-disk-0', 'a', 'b') },
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
    my $want = {
        driver => 'nbd',
        server => { type => 'unix', path => '/run/tandem/nbd.sock' },
        export => 'vm-100-disk-0',
        'reconnect-delay' => 10,
    };
    is_deeply($opts, $want, 'blockdev dict');
    like(JSON::PP->new->canonical->encode($opts), qr/"reconnect-delay":10\b/,
        'delay is a JSON int');
    $scfg->{'tandem-reconnect-delay'} = '30';
    like(JSON::PP->new->encode($P->qemu_blockdev_options($scfg, 's', 'vm-100-disk-0')),
        qr/"reconnect-delay":30\b/, 'configured delay, as a JSON number');
    eval { $P->path({ 'tandem-socket' => '/run/a:b.sock' }, 'vm-100-disk-0', 's') };
    like($@, qr/\Atandem: NBD socket path .* must not contain ':'\n\z/, 'colon refused');

    # What qemu-server gets: PVE::Storage::qemu_blockdev_options applies its allow-list and
    # drops (with a warning) any key it does not know.
    my $cfg = storage_cfg("tandem: tandem\n\tcontent images\n\tshared 1\n"
        . "\ttandem-socket /run/tandem/nbd.sock\n");
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, $_[0] };
    is_deeply(PVE::Storage::qemu_blockdev_options($cfg, 'tandem:vm-100-disk-0', '10.0', {}),
        $want, "PVE::Storage::qemu_blockdev_options: the dict, unchanged");
    is_deeply(\@warnings, [], 'every key passes the allow-list');
    is(scalar(PVE::Storage::path($cfg, 'tandem:vm-100-disk-0')), $path, 'PVE::Storage::path');
};

done_testing();
