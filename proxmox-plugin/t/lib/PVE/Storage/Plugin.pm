package PVE::Storage::Plugin;

# Test stand-in for libpve-storage-perl's base class (not installable in CI). Written from
# the documented plugin contract (shared/ref/proxmox.md §1.3), not from Proxmox's code: it
# provides only the defaults a block-storage plugin inherits and may rely on.

use strict;
use warnings;

use PVE::Cluster;
use PVE::JSONSchema;

sub api {
    die "a storage plugin must implement api()\n";
}

# Formats derived from plugindata()->{format} = [{fmt => 1, ...}, 'default'].
sub get_formats {
    my ($class, $scfg, $storeid) = @_;
    my $format = $class->plugindata()->{format} // [{ raw => 1 }, 'raw'];
    return { default => $format->[1], valid => { %{ $format->[0] } } };
}

sub volume_qemu_snapshot_method {
    return 'storage';
}

sub volume_has_feature {
    return undef;
}

sub check_connection {
    return 1;
}

sub cluster_lock_storage {
    my ($class, $storeid, $shared, $timeout, $func, @param) = @_;
    return PVE::Cluster::cfs_lock_storage($storeid, $timeout, $func, @param) if $shared;
    return $func->(@param);
}

sub on_add_hook { return undef }
sub on_update_hook { return undef }
sub on_delete_hook { return undef }

1;
