#!/usr/bin/perl -T
# The exact argv the plugin gives `tandem`, recorded by a fake CLI: KiB -> bytes, argument
# order, name generation, forwarding of tandem-pool/-replicas/-protocol only when set (the
# flags of the replicated-volume CLI), the shared `node info` and `node info --pools`, the
# storage's identity, and the error paths: the CLI's message, garbage output, a missing
# binary, a CLI that hangs.

use strict;
use warnings;

use FindBin;
BEGIN { $FindBin::Bin =~ m/\A(.*)\z/s; unshift @INC, "$1/lib"; }

use Digest::SHA ();
use JSON::PP;
use Test::More;
use Time::HiRes ();
no warnings "once";
use TandemTest qw(plugin fake_cli);

my $P = plugin();
my $fake = fake_cli();
{
    no warnings 'once';
    $PVE::Storage::Custom::TandemPlugin::CLI = $fake->{cli};
}

my $VOL = '{"name":"vm-100-disk-2","pool":"files","size_bytes":67108864,"path":"/x","state":"ok","created_unix":1}';

sub last_call { my $calls = $fake->calls; return $calls->[-1] }

subtest 'alloc_image: KiB to bytes, generated name skips existing volumes' => sub {
    $fake->reset;
    $fake->set('list.json', '[{"name":"vm-100-disk-0"},{"name":"vm-100-disk-1"},{"name":"vm-1000-disk-2"},{"name":"other"}]');
    $fake->set('out.json', $VOL);
    my $name = $P->alloc_image('store', {}, 100, 'raw', undef, 65536);
    is($name, 'vm-100-disk-2', 'first free index');
    is_deeply($fake->calls, [
        ['--json', 'volume', 'list'],
        ['--json', 'volume', 'create', 'vm-100-disk-2', '--size', '67108864'],
    ], 'argv: list, then create with bytes');
};

subtest 'alloc_image: every storage option forwarded, in order' => sub {
    $fake->reset;
    $fake->set('out.json', $VOL);
    my $scfg = {
        'tandem-config' => '/etc/tandem/other.toml', 'tandem-pool' => 'nvme',
        'tandem-replicas' => 2, 'tandem-protocol' => 'C', 'tandem-nodes' => 'hv1,hv2',
    };
    is($P->alloc_image('store', $scfg, 100, 'raw', 'vm-100-disk-7', 1024), 'vm-100-disk-7',
        'given name kept');
    is_deeply($fake->calls, [[
        '--config', '/etc/tandem/other.toml', '--json', 'volume', 'create', 'vm-100-disk-7',
        '--size', '1048576', '--pool', 'nvme', '--replicas', '2', '--protocol', 'C',
        '--nodes', 'hv1,hv2',
    ]], 'argv with config, pool, replicas, protocol, nodes; no list when the name is given');
    $fake->reset;
    $fake->set('out.json', $VOL);
    $P->alloc_image('store', { 'tandem-protocol' => 'A' }, 5, undef, 'vm-5-cloudinit', 4096);
    is_deeply(last_call(), ['--json', 'volume', 'create', 'vm-5-cloudinit', '--size', '4194304',
        '--protocol', 'A'], 'only the options that are set');
};

subtest 'alloc_image refuses before calling the CLI' => sub {
    $fake->reset;
    for my $case (
        [[100, 'qcow2', undef, 1024], qr/\Atandem: unsupported format 'qcow2'/],
        [[100, 'raw', 'vm-101-disk-0', 1024], qr/\Atandem: illegal name 'vm-101-disk-0'/],
        [[100, 'raw', 'base-100-disk-0', 1024], qr/\Atandem: illegal name/],
        [[100, 'raw', 'vm-100-disk-0', '1.5'], qr/\Atandem: invalid size '1.5'/],
        [[100, 'raw', 'vm-100-disk-0', -1], qr/\Atandem: invalid size/],
        [[100, 'raw', '../etc', 1], qr/\Atandem: unable to parse volume name/],
    ) {
        eval { $P->alloc_image('store', {}, @{ $case->[0] }) };
        like($@, $case->[1], "refused: @{[ map { $_ // 'undef' } @{ $case->[0] } ]}");
        like($@, qr/\n\z/, 'one line, no trace');
    }
    eval { $P->alloc_image('store', { 'tandem-protocol' => 'A;rm' }, 1, 'raw', 'vm-1-d', 1) };
    like($@, qr/\Atandem: tandem-protocol must be A, B or C\n\z/, 'bad protocol refused');
    eval { $P->alloc_image('store', { 'tandem-nodes' => 'hv1, hv2' }, 1, 'raw', 'vm-1-d', 1) };
    like($@, qr/\Atandem: tandem-nodes must be a comma-separated list/, 'bad node list refused');
    is_deeply($fake->calls, [], 'the CLI was never run');
};

subtest 'resize, free, show, list: argv and sizes' => sub {
    $fake->reset;
    $fake->set('out.json', $VOL);
    $P->volume_resize({}, 'store', 'vm-100-disk-2', 2 * 1024**3, 0);
    is_deeply(last_call(), ['--json', 'volume', 'resize', 'vm-100-disk-2', '--size', '2147483648'],
        'resize passes bytes');
    my $size = $P->volume_size_info({}, 'store', 'vm-100-disk-2', 5);
    is($size, 67108864, 'size in scalar context');
    my @info = $P->volume_size_info({}, 'store', 'vm-100-disk-2', 5);
    is_deeply(\@info, [67108864, 'raw', 67108864, undef, 1], 'size info in list context');
    is_deeply(last_call(), ['--json', 'volume', 'show', 'vm-100-disk-2'], 'show argv');
    $fake->set('out.json', '{"name":"vm-100-disk-2","deleted":true}');
    is($P->free_image('store', {}, 'vm-100-disk-2', 0, 'raw'), undef, 'free returns undef');
    is_deeply(last_call(), ['--json', 'volume', 'delete', 'vm-100-disk-2'], 'delete argv');
};

subtest 'rename_volume: generated or given target name, argv, volid' => sub {
    $fake->reset;
    $fake->set('list.json', '[{"name":"vm-200-disk-0"},{"name":"vm-100-disk-2"}]');
    $fake->set('out.json', $VOL);
    is($P->rename_volume({}, 'store', 'vm-100-disk-2', 200, undef), 'store:vm-200-disk-1',
        'first free name of the target VM');
    is_deeply($fake->calls, [
        ['--json', 'volume', 'list'],
        ['--json', 'volume', 'rename', 'vm-100-disk-2', 'vm-200-disk-1'],
    ], 'argv: list, then rename OLD NEW');
    $fake->reset;
    $fake->set('out.json', $VOL);
    is($P->rename_volume({ 'tandem-config' => '/etc/tandem/other.toml' }, 'store',
        'vm-100-disk-2', 300, 'vm-300-disk-4'), 'store:vm-300-disk-4', 'given target kept');
    is_deeply($fake->calls, [[
        '--config', '/etc/tandem/other.toml', '--json', 'volume', 'rename', 'vm-100-disk-2',
        'vm-300-disk-4',
    ]], 'no list when the target is given');
    $fake->reset;
    eval { $P->rename_volume({}, 'store', 'vm-100-disk-2', 300, 'vm-301-disk-0') };
    is($@, "tandem: illegal target name 'vm-301-disk-0' - should be 'vm-300-*'\n",
        'target of another VM refused');
    eval { $P->rename_volume({}, 'store', 'vm-100-disk-2', 'x', undef) };
    is($@, "tandem: invalid target VMID 'x'\n", 'bad VMID refused');
    is_deeply($fake->calls, [], 'the CLI was never run for refused arguments');
    $fake->set('stderr', "tandem: vm-100-disk-2 is in use on hv1 (Primary); stop the VM first\n");
    $fake->set('exit', 1);
    eval { $P->rename_volume({}, 'store', 'vm-100-disk-2', 300, 'vm-300-disk-4') };
    is($@, "tandem: vm-100-disk-2 is in use on hv1 (Primary); stop the VM first\n",
        "the daemon's refusal, unchanged");
};

subtest 'list_images: vmid, vollist, pool filter' => sub {
    $fake->reset;
    $fake->set('list.json', '[' . join(',',
        '{"name":"vm-100-disk-0","pool":"files","size_bytes":1024,"created_unix":5}',
        '{"name":"vm-101-disk-0","pool":"nvme","size_bytes":2048,"created_unix":6}',
        '{"name":"scratch","pool":"files","size_bytes":1,"created_unix":7}') . ']');
    my $all = $P->list_images('st', {}, undef, undef, {});
    is_deeply([map { $_->{volid} } @$all], ['st:vm-100-disk-0', 'st:vm-101-disk-0'],
        'non-Proxmox volumes are skipped');
    is_deeply($all->[0], { volid => 'st:vm-100-disk-0', format => 'raw', size => 1024,
        vmid => 100, ctime => 5 }, 'entry shape');
    is_deeply([map { $_->{volid} } @{ $P->list_images('st', {}, 101) }], ['st:vm-101-disk-0'],
        'vmid filter');
    is_deeply([map { $_->{volid} } @{ $P->list_images('st', {}, 101, ['st:vm-100-disk-0']) }],
        ['st:vm-100-disk-0'], 'vollist wins over vmid');
    is_deeply([map { $_->{volid} } @{ $P->list_images('st', { 'tandem-pool' => 'nvme' }) }],
        ['st:vm-101-disk-0'], 'tandem-pool filter');
    my $cache = {};
    $fake->reset;
    $fake->set('list.json', '[]');
    $P->list_images('st', {}, 1, undef, $cache) for 1 .. 3;
    is(scalar(@{ $fake->calls }), 1, 'one CLI call per $cache');
};

my $NODE_INFO = encode_json({
    name => 'hv1', run_dir => '/run/tandem', pools => ['nvme', 'files'],
    nodes => [map { {
        name => $_->[0], control => "192.168.1.$_->[1]:7700",
        replication => "10.10.10.$_->[1]:7788", diskless => $_->[2],
    } } (['hv1', 11, JSON::PP::false], ['hv2', 12, JSON::PP::false],
        ['witness', 13, JSON::PP::true])],
});
my $UNREACHABLE = "tandem: cannot reach tandemd at /run/tandem/tandemd.sock (is it running?)\n";

subtest 'node info: one call serves every storage of a tandemd, a failure too' => sub {
    $fake->reset;
    $fake->set('out.json', $NODE_INFO);
    ok($P->check_connection('a', {}), 'check_connection');
    ok($P->activate_storage('a', {}, {}), 'activate_storage');
    ok($P->check_connection('b', { 'tandem-pool' => 'files' }), 'another storage: check');
    ok($P->activate_storage('b', { 'tandem-pool' => 'files' }, {}), '... activate');
    is($P->path({}, 'vm-1-disk-0', 'a'), 'nbd:unix:/run/tandem/nbd.sock:exportname=vm-1-disk-0',
        'path: the socket in its run_dir');
    is_deeply($fake->calls, [['--json', 'node', 'info']], 'one `tandem node info` for all');
    my $other = { 'tandem-config' => '/etc/tandem/other.toml' };
    ok($P->check_connection('c', $other), 'a storage of another tandem-config');
    ok($P->activate_storage('c', $other, {}), '... activate');
    is_deeply($fake->calls->[-1], ['--config', '/etc/tandem/other.toml', '--json', 'node', 'info'],
        '... has its own `tandem node info`');
    is(scalar(@{ $fake->calls }), 2, '... once');

    $fake->reset;
    $fake->set('stderr', $UNREACHABLE);
    $fake->set('exit', 1);
    my $down = { 'tandem-config' => '/etc/tandem/down.toml' };
    for my $storeid (qw(d e)) {
        eval { $P->check_connection($storeid, $down) };
        is($@, $UNREACHABLE, "$storeid: the failure");
    }
    is(scalar(@{ $fake->calls }), 1, 'the failure was cached: one call');
    local $PVE::Storage::Custom::TandemPlugin::STATUS_TTL = 0;    # a failure's TTL
    eval { $P->check_connection('d', $down) };
    is_deeply($fake->calls->[-1],
        ['--config', '/etc/tandem/down.toml', '--json', 'node', 'info', '--pools'],
        'asked again once its TTL is over, with the pools (for the status that follows)');
};

subtest 'status: one `node info --pools` answers status and the next checks' => sub {
    local $PVE::Storage::Custom::TandemPlugin::STATUS_TTL = 0.5;
    $fake->reset;
    $fake->set('out.json', $NODE_INFO);
    my $answer = decode_json($NODE_INFO);
    $answer->{pool_list} = [
        { name => 'nvme', backend => 'lvm-thin', total_bytes => 1000, used_bytes => 300,
            free_bytes => 700, provisioned_bytes => 4000, volumes => 2 },
        { name => 'files', backend => 'file', total_bytes => 0, used_bytes => 0,
            free_bytes => 0, provisioned_bytes => 0, volumes => 0,
            error => "pool 'files': stat file system of /srv/files: No such file or directory" },
    ];
    $fake->set('pools.json', encode_json($answer));
    my $scfg = { 'tandem-config' => '/etc/tandem/status.toml' };
    my $files = { %$scfg, 'tandem-pool' => 'files' };
    my $ask = ['--config', '/etc/tandem/status.toml', '--json', 'node', 'info', '--pools'];

    is_deeply([$P->status('a', $scfg, {})], [1000, 700, 300, 1], 'status: the first pool');
    eval { $P->status('b', $files, {}) };
    is($@, "tandem: pool 'files': stat file system of /srv/files: No such file or directory\n",
        'a pool tandemd could not query fails its storages only, with the reason');
    ok($P->check_connection('b', $files) && $P->activate_storage('b', $files, {}),
        'check_connection, activate_storage');
    is_deeply($fake->calls, [$ask], "one call: status's answer also served the checks");
    Time::HiRes::sleep(0.6);
    $P->status('a', $scfg, {});
    is_deeply($fake->calls, [$ask, $ask], 'status asks again once its TTL is over');

    $fake->set('exit', 1);
    $fake->set('stderr', $UNREACHABLE);
    Time::HiRes::sleep(0.6);
    eval { $P->status('a', $scfg, {}) };
    is($@, $UNREACHABLE, 'tandemd gone: status fails');
    eval { $P->check_connection('a', $scfg) };
    is($@, $UNREACHABLE, '... and so does the next check');
    is(scalar(@{ $fake->calls }), 3, '... from the cached failure');

    $fake->set('exit', 0);
    $fake->set('stderr', undef);
    Time::HiRes::sleep(0.6);
    ok($P->check_connection('a', $scfg), 'tandemd back: the check asks again');
    is_deeply([$P->status('a', $scfg, {})], [1000, 700, 300, 1], '... and status');
    is_deeply($fake->calls->[3], $ask, "with one call, the pools' answer");
    is(scalar(@{ $fake->calls }), 4, '... that served both');
};

subtest 'get_identity: tandem:<pool>@<cluster>, the same from every node' => sub {
    local $PVE::Storage::Custom::TandemPlugin::NODE_INFO_TTL = 0;    # a new answer each call
    $fake->reset;
    $fake->set('out.json', $NODE_INFO);
    # The identity must stay stable across plugin versions: its derivation is pinned here.
    my $cluster = substr(Digest::SHA::sha256_hex(join("\n",
        'hv1 192.168.1.11:7700 10.10.10.11:7788', 'hv2 192.168.1.12:7700 10.10.10.12:7788',
        'witness 192.168.1.13:7700 10.10.10.13:7788')), 0, 16);
    is($P->get_identity({}, 'a'), "tandem:nvme\@$cluster", 'no tandem-pool: the first pool');
    is($P->get_identity({ 'tandem-pool' => 'files' }, 'b'), "tandem:files\@$cluster",
        'tandem-pool files');
    is_deeply($fake->calls->[-1], ['--json', 'node', 'info'], 'from `tandem node info`');
    my $info = decode_json($NODE_INFO);
    $info->{name} = 'hv2';
    $info->{nodes} = [reverse @{ $info->{nodes} }];
    $fake->set('out.json', encode_json($info));
    is($P->get_identity({}, 'a'), "tandem:nvme\@$cluster",
        'asked on hv2, nodes listed in another order');
    $info->{nodes}->[0]->{replication} = '10.10.20.13:7788';
    $fake->set('out.json', encode_json($info));
    isnt($P->get_identity({}, 'a'), "tandem:nvme\@$cluster", 'another cluster: another identity');
    eval { $P->get_identity({ 'tandem-pool' => 'ssd' }, 'a') };
    is($@, "tandem: pool 'ssd' is not configured on node 'hv2'\n", 'unknown pool');
    $fake->set('out.json', '{"name":"hv1","pools":["nvme"],"nodes":[]}');
    eval { $P->get_identity({}, 'a') };
    is($@, "tandem: 'tandem node info' reported no nodes\n", 'no node list');
    $fake->set('exit', 1);
    $fake->set('stderr', $UNREACHABLE);
    eval { $P->get_identity({}, 'a') };
    is($@, $UNREACHABLE, "the CLI's error");
};

subtest 'CLI failures become one clean line' => sub {
    $fake->reset;
    $fake->set('stderr', "tandem: volume 'vm-9-disk-0' not found\n");
    $fake->set('exit', 1);
    eval { $P->volume_size_info({}, 'st', 'vm-9-disk-0') };
    is($@, "tandem: volume 'vm-9-disk-0' not found\n", 'the CLI message, unchanged');
    $fake->set('stderr', "warning: noise\nsomething bad\n");
    eval { $P->activate_volume('st', {}, 'vm-9-disk-0') };
    is($@, "tandem: something bad\n", 'last stderr line, prefixed once');
    $fake->set('stderr', "error: unexpected argument '--replicas' found\n\n  tip: to pass it\n\n"
        . "Usage: tandem volume create --size <SIZE> <NAME>\n\nFor more information, try '--help'.\n");
    eval { $P->activate_volume('st', {}, 'vm-9-disk-0') };
    is($@, "tandem: unexpected argument '--replicas' found\n", 'usage error: the error line');
    $fake->set('stderr', undef);
    eval { $P->free_image('st', {}, 'vm-9-disk-0') };
    is($@, "tandem: 'tandem volume delete vm-9-disk-0' failed with exit code 1\n",
        'silent failure still explained');
    $fake->reset;
    $fake->set('out.json', 'not json');
    eval { $P->volume_size_info({}, 'st', 'vm-9-disk-0') };
    like($@, qr/\Atandem: cannot parse the output of 'tandem volume show vm-9-disk-0': [^\n]*\n\z/,
        'garbage output');
    $fake->set('out.json', '{"name":"vm-9-disk-0"}');
    eval { $P->volume_size_info({}, 'st', 'vm-9-disk-0') };
    like($@, qr/\Atandem: .*returned no size\n\z/, 'missing field');
    $fake->set('out.json', '{"name":"vm-9-disk-0","size_bytes":1,"state":"missing"}');
    eval { $P->activate_volume('st', {}, 'vm-9-disk-0') };
    is($@, "tandem: volume 'vm-9-disk-0' is missing on this node\n", 'missing storage');
    eval { $P->volume_size_info({ 'tandem-config' => 'relative.toml' }, 'st', 'vm-9-disk-0') };
    like($@, qr/\Atandem: tandem-config must be an absolute path/, 'relative config refused');
    {
        local $PVE::Storage::Custom::TandemPlugin::CLI = "$fake->{dir}/does-not-exist";
        eval { $P->volume_size_info({}, 'st', 'vm-9-disk-0') };
        like($@, qr/\Atandem: cannot run \S+does-not-exist: No such file or directory\n\z/,
            'missing binary');
    }
};

subtest 'a hung CLI is killed at the timeout' => sub {
    $fake->reset;
    $fake->set('sleep', 30);
    local $PVE::Storage::Custom::TandemPlugin::READ_TIMEOUT = 1;
    my $t0 = Time::HiRes::time();
    eval { $P->volume_size_info({}, 'st', 'vm-9-disk-0') };
    my $took = Time::HiRes::time() - $t0;
    is($@, "tandem: 'tandem volume show vm-9-disk-0' timed out after 1s (is tandemd hung?)\n",
        'timeout message');
    cmp_ok($took, '<', 3, sprintf('returned after %.1fs', $took));
    eval { $P->volume_size_info({}, 'st', 'vm-9-disk-0', 2) };
    like($@, qr/timed out after 2s/, "PVE's own timeout argument is used");
};

done_testing();
