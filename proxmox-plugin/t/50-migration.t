#!/usr/bin/perl -T
# Live migration under Proxmox (issue 8), with a fake CLI: an `activate_volume` while the
# volume is Primary on another node arms two Primaries (cluster-wide, `allow-two-primaries
# on`); refused with a clear message under protocol A/B or with a replica that is not
# UpToDate, before anything changes; `deactivate_volume` switches the window off.

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

my $NAME = 'vm-9-disk-0';
my $VOL = qq({"name":"$NAME","pool":"files","size_bytes":67108864,"path":"/x","state":"ok","created_unix":1});

sub status_json {
    my (%o) = @_;
    my $role = $o{role} // 'Secondary';
    my $peer_role = $o{peer_role} // 'Primary';
    my $disk = $o{disk} // 'UpToDate';
    my $protocol = $o{protocol} // 'C';
    my $allow = $o{allow} ? 'true' : 'false';
    return qq({"volume":"$NAME","node":"hv2","role":"$role","disk_state":"$disk",)
        . qq("protocol":"$protocol","quorum":true,"io_suspended":false,)
        . qq("allow_two_primaries":$allow,"size_bytes":67108864,"current_uuid":"",)
        . qq("peers":[{"node":"hv1","diskless":false,"connection":"Connected",)
        . qq("role":"$peer_role","disk_state":"UpToDate","replication":"Established",)
        . qq("out_of_sync_bytes":0}],"promoted_explicitly":false,"open_writers":0});
}

sub setup {
    $fake->reset;
    $fake->set('out.json', $VOL);
    $fake->set('status.json', status_json(@_));
}

my $ARM = ['--json', 'volume', 'allow-two-primaries', $NAME, 'on'];
my $DISARM = ['--json', 'volume', 'allow-two-primaries', $NAME, 'off'];

subtest 'activate while Primary elsewhere arms two Primaries' => sub {
    setup();
    ok($P->activate_volume('st', {}, $NAME, undef, {}), 'activated');
    is_deeply($fake->calls, [
        ['--json', 'volume', 'show', $NAME],
        ['--json', 'volume', 'status', $NAME],
        $ARM,
    ], 'show, status, then allow-two-primaries on');
    setup(allow => 1);
    ok($P->activate_volume('st', {}, $NAME, undef, {}), 'already armed');
    is(scalar(grep { $_->[2] eq 'allow-two-primaries' } @{ $fake->calls }), 0, 'not armed twice');
};

subtest 'a normal activation changes nothing' => sub {
    setup(peer_role => 'Secondary');
    ok($P->activate_volume('st', {}, $NAME, undef, {}), 'nobody Primary');
    is(scalar(@{ $fake->calls }), 2, 'show and status only');
    setup(role => 'Primary', peer_role => 'Secondary');
    ok($P->activate_volume('st', {}, $NAME, undef, {}), 'Primary here');
    is(scalar(@{ $fake->calls }), 2, 'show and status only');
    $fake->reset;
    $fake->set('out.json', $VOL);
    $fake->set('status.json', '{"volume":"vm-9-disk-0","role":"Primary","peers":[]}');
    ok($P->activate_volume('st', {}, $NAME, undef, {}), 'unreplicated volume');
    is(scalar(@{ $fake->calls }), 2, 'show and status only');
};

subtest 'refused before anything changes' => sub {
    setup(protocol => 'A');
    eval { $P->activate_volume('st', {}, $NAME, undef, {}) };
    is($@, "tandem: $NAME is Primary on hv1 and runs protocol A; live migration needs protocol C\n",
        'protocol A');
    is(scalar(@{ $fake->calls }), 2, 'not armed');
    setup(protocol => 'B');
    eval { $P->activate_volume('st', {}, $NAME, undef, {}) };
    like($@, qr/runs protocol B; live migration needs protocol C\n\z/, 'protocol B');
    setup(disk => 'Outdated');
    eval { $P->activate_volume('st', {}, $NAME, undef, {}) };
    is($@, "tandem: $NAME is Primary on hv1; the replica on hv2 is Outdated, "
        . "live migration needs it UpToDate\n", 'Outdated destination');
    is(scalar(@{ $fake->calls }), 2, 'not armed');
    setup();
    $fake->set('stderr', "tandem: cannot allow two primaries for '$NAME': the replica on hv1 is Inconsistent\n");
    $fake->set('exit', 1);
    eval { $P->activate_volume('st', {}, $NAME, undef, {}) };
    like($@, qr/\Atandem: /, "tandemd's refusal is passed on");
};

subtest 'deactivate closes the window' => sub {
    setup(role => 'Secondary', peer_role => 'Primary', allow => 1);
    ok($P->deactivate_volume('st', {}, $NAME, undef, {}), 'source after the migration');
    is_deeply($fake->calls, [['--json', 'volume', 'status', $NAME], $DISARM],
        'status, then allow-two-primaries off');
    setup(allow => 0);
    ok($P->deactivate_volume('st', {}, $NAME, undef, {}), 'nothing armed');
    is_deeply($fake->calls, [['--json', 'volume', 'status', $NAME]], 'status only');
    setup(allow => 1);
    $fake->set('exit', 1);
    $fake->set('stderr', "tandem: cannot reach tandemd\n");
    my $warned = '';
    local $SIG{__WARN__} = sub { $warned .= $_[0] };
    ok($P->deactivate_volume('st', {}, $NAME, undef, {}), 'a failure does not fail the stop');
    like($warned, qr/could not switch two Primaries off/, 'but is reported');
};

done_testing();
