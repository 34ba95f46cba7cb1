package PVE::JSONSchema;

# Test stand-in for PVE::JSONSchema: checks that a plugin's properties() are schema entries
# PVE can register (known type, description, consistent enum/min/max/default) and that a
# value fits an entry. Written from the JSON-schema subset PVE uses, not from its code.

use strict;
use warnings;

my %TYPES = map { $_ => 1 } qw(string integer number boolean);

# Returns a list of problems (empty when the property hash is acceptable).
sub check_properties {
    my ($props) = @_;
    my @problems;
    for my $name (sort keys %$props) {
        my $p = $props->{$name};
        push @problems, "$name: no description" if !$p->{description};
        push @problems, "$name: unknown type '" . ($p->{type} // '') . "'"
            if !$TYPES{ $p->{type} // '' };
        push @problems, "$name: enum is not a list" if exists $p->{enum} && ref($p->{enum}) ne 'ARRAY';
        if (defined $p->{default}) {
            my $err = check_value($p, $p->{default});
            push @problems, "$name: default: $err" if $err;
        }
    }
    return @problems;
}

# undef if $value fits $schema, else the reason.
sub check_value {
    my ($schema, $value) = @_;
    my $type = $schema->{type} // 'string';
    if ($type eq 'integer') {
        return "'$value' is not an integer" if $value !~ m/\A-?\d+\z/;
    } elsif ($type eq 'number') {
        return "'$value' is not a number" if $value !~ m/\A-?\d+(\.\d+)?\z/;
    } elsif ($type eq 'boolean') {
        return "'$value' is not a boolean" if $value !~ m/\A[01]\z/;
    }
    return "'$value' is below $schema->{minimum}"
        if defined $schema->{minimum} && $value < $schema->{minimum};
    return "'$value' is above $schema->{maximum}"
        if defined $schema->{maximum} && $value > $schema->{maximum};
    return "'$value' is not one of " . join(', ', @{ $schema->{enum} })
        if $schema->{enum} && !grep { $_ eq $value } @{ $schema->{enum} };
    return "'$value' does not match $schema->{pattern}"
        if defined $schema->{pattern} && $value !~ m/\A(?:$schema->{pattern})\z/;
    return "'$value' is longer than $schema->{maxLength}"
        if defined $schema->{maxLength} && length($value) > $schema->{maxLength};
    return undef;
}

1;
