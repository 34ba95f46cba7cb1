package PVE::Cluster;

# Test stand-in for PVE::Cluster: a cluster-wide storage lock that just runs the code.

use strict;
use warnings;

our @LOCKS;    # storage IDs locked, in order (tests may inspect them)

sub cfs_lock_storage {
    my ($storeid, $timeout, $code, @param) = @_;
    push @LOCKS, $storeid;
    return $code->(@param);
}

1;
