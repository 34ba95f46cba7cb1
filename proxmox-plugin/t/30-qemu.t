#!/usr/bin/perl -T
# What QEMU gets from the plugin works against a real tandemd: the qemu_blockdev_options
# dict (PVE 9, machine >= 10.0) and the path() string (older machine versions) both open
# the volume, report its size, and carry the same bytes. Needs qemu-img and qemu-io
# (qemu-utils); set TANDEM_SKIP_QEMU=1 to skip where they are missing on purpose.

use strict;
use warnings;

use FindBin;
BEGIN { $FindBin::Bin =~ m/\A(.*)\z/s; unshift @INC, "$1/lib"; }

use JSON::PP;
use Test::More;
use TandemTest qw(plugin start_daemon run_cmd storage_cfg);

my ($qemu_img) = grep { -x } qw(/usr/bin/qemu-img /usr/local/bin/qemu-img);
my ($qemu_io) = grep { -x } qw(/usr/bin/qemu-io /usr/local/bin/qemu-io);
if (!$qemu_img || !$qemu_io) {
    plan skip_all => 'qemu-img/qemu-io missing (TANDEM_SKIP_QEMU set)' if $ENV{TANDEM_SKIP_QEMU};
    BAIL_OUT('qemu-img and qemu-io are needed (apt-get install qemu-utils), '
        . 'or set TANDEM_SKIP_QEMU=1');
}

my $P = plugin();
my $node = start_daemon();
my $scfg = { 'tandem-config' => $node->{config} };    # socket found through `node info`
my $MiB = 1024 * 1024;

sub qemu_img_size {
    my ($filename) = @_;
    my ($status, $out, $err) = run_cmd(30, $qemu_img, 'info', '--output=json', $filename);
    is($status, 0, "qemu-img info $filename") or diag($err);
    my $info = eval { decode_json($out) } // {};
    return $info->{'virtual-size'};
}

sub qemu_io {
    my ($filename, $command) = @_;
    my ($status, $out, $err) = run_cmd(30, $qemu_io, '-f', 'raw', '-c', $command, $filename);
    my $text = "$out$err";
    ok($status == 0 && $text !~ m/fail|error/i, "qemu-io '$command'") or diag($text);
}

my $vol = $P->alloc_image('tandem', $scfg, 100, 'raw', undef, 64 * 1024);
ok($P->activate_volume('tandem', $scfg, $vol, undef, {}, {}), 'activated');

my $path = $P->path($scfg, $vol, 'tandem');
is($path, "nbd:unix:$node->{nbd}:exportname=$vol", 'path uses <run_dir>/nbd.sock from node info');
my $dict = $P->qemu_blockdev_options($scfg, 'tandem', $vol, '10.0', { hints => {} });
{
    # What qemu-server gets: the dict after PVE::Storage's allow-list (which warns on a drop).
    my $cfg = storage_cfg("tandem: tandem\n\tcontent images\n\tshared 1\n"
        . "\ttandem-config $node->{config}\n");
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, $_[0] };
    is_deeply(PVE::Storage::qemu_blockdev_options($cfg, "tandem:$vol", '10.0', { hints => {} }),
        $dict, 'PVE::Storage::qemu_blockdev_options gives the plugin dict');
    is_deeply(\@warnings, [], 'every key passes the allow-list');
}
my $json = 'json:' . JSON::PP->new->canonical->encode({ driver => 'raw', file => $dict });

is(qemu_img_size($json), 64 * $MiB, 'blockdev dict: qemu-img sees 64 MiB');
is(qemu_img_size($path), 64 * $MiB, 'path string: qemu-img sees 64 MiB');

qemu_io($path, 'read -P 0 0 64M');    # sparseinit: a new volume reads as zeros
qemu_io($json, 'write -P 0xa5 1M 2M');
qemu_io($path, 'read -P 0xa5 1M 2M');
qemu_io($path, 'read -P 0 0 1M');
{
    # The check above would notice wrong bytes: qemu-io reports a pattern mismatch.
    my ($status, $out, $err) = run_cmd(30, $qemu_io, '-f', 'raw', '-c', 'read -P 0xa5 0 1M', $path);
    like("$out$err", qr/Pattern verification failed/, 'a mismatch is detected');
}

{
    # Why volume_resize refuses a running VM: QEMU cannot grow an attached NBD disk.
    my ($status, $out, $err) = run_cmd(30, $qemu_io, '-f', 'raw', '-c', 'truncate 96M', $json);
    like("$out$err", qr/Cannot grow NBD nodes/, 'QEMU refuses to grow an open NBD node');
}
$P->volume_resize($scfg, 'tandem', $vol, 96 * $MiB, 0);
is(qemu_img_size($json), 96 * $MiB, 'after resize: qemu-img sees 96 MiB');
qemu_io($json, 'read -P 0xa5 1M 2M');

ok($P->deactivate_volume('tandem', $scfg, $vol, undef, {}), 'deactivated');

# Reassigned to another VM: the new path opens with the same size and bytes, the old fails.
my $volid = $P->rename_volume($scfg, 'tandem', $vol, 101, undef);
is($volid, 'tandem:vm-101-disk-0', 'renamed for VM 101');
my $old_path = $path;
$vol = 'vm-101-disk-0';
$path = $P->path($scfg, $vol, 'tandem');
is($path, "nbd:unix:$node->{nbd}:exportname=$vol", 'path of the new name');
is(qemu_img_size($path), 96 * $MiB, 'after rename: qemu-img info on the new path');
qemu_io($path, 'read -P 0xa5 1M 2M');
{
    my ($status) = run_cmd(30, $qemu_img, 'info', $old_path);
    isnt($status, 0, 'the old name no longer opens');
}

$P->free_image('tandem', $scfg, $vol, 0);
my ($status, undef, $err) = run_cmd(30, $qemu_img, 'info', $path);
isnt($status, 0, 'a freed volume cannot be opened');
like($err, qr/\Q$vol\E|export/i, "qemu-img names the missing export: $err");

done_testing();
