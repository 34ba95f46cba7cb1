package PVE::Storage;

# Test stand-in for the parts of PVE::Storage a custom plugin meets, written from the
# documented contract (shared/ref/proxmox.md §1.1, §3): the API version window the loader
# enforces, and the allow-list applied to qemu_blockdev_options' result.

use strict;
use warnings;

our $TEST_APIVER = 15;
our $TEST_APIAGE = 6;

sub APIVER { return $TEST_APIVER }
sub APIAGE { return $TEST_APIAGE }

# What the loader decides for a plugin class: ('load'|'load-warn'|'skip', message).
sub check_custom_plugin {
    my ($class) = @_;
    return ('skip', "$class is not a PVE::Storage::Plugin")
        if !$class->isa('PVE::Storage::Plugin');
    return ('skip', "$class has no api()") if !$class->can('api');
    my $api = $class->api();
    return ('skip', "newer than current ($api > " . APIVER() . ")") if $api > APIVER();
    return ('skip', "too old ($api < " . (APIVER() - APIAGE()) . ")")
        if $api < APIVER() - APIAGE();
    return ('load-warn', "implementing an older storage API") if $api != APIVER();
    return ('load', '');
}

# Allowed blockdev drivers and their keys (ref/proxmox.md §3). Dies on an unknown driver,
# returns the list of keys the real code would drop with a warning.
my %ALLOWED = (
    file          => { map { $_ => 1 } qw(filename) },
    host_device   => { map { $_ => 1 } qw(filename) },
    nbd           => { map { $_ => 1 } qw(server export reconnect-delay open-timeout) },
    iscsi         => {},
    rbd           => {},
);

sub check_blockdev_options {
    my ($options) = @_;
    my $driver = $options->{driver} // die "blockdev options without a driver\n";
    my $allowed = $ALLOWED{$driver} or die "blockdev driver '$driver' is not allowed\n";
    return [grep { $_ ne 'driver' && !$allowed->{$_} } sort keys %$options];
}

1;
