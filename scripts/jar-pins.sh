# shellcheck shell=bash
# SHA-256 pins for the jars scripts/kafka and scripts/hapi fetch from Maven Central.
# Sourced by both. A pin file lists `sha256  file.jar` lines (sha256sum's format),
# one per jar of the classpath; lines starting with # are comments.
#
# Maven checks each download against the .sha1 the same repository serves (mvn -C
# makes a mismatch fatal); that catches corruption, not a tampered repository or
# mirror. The pins are ours, reviewed in the repository, and checked before a JVM
# loads a single class from the jars: a jar that differs, is missing, or was added
# to the classpath stops the script.

# pins_verify DIR PIN_FILE WHAT: exit status 0 when DIR's *.jar match PIN_FILE exactly;
# otherwise prints what differs on stderr and returns 1.
pins_verify() {
    local dir="$1" pins="$2" what="$3" expected actual problems
    if [ ! -f "$pins" ]; then
        printf '%s: error: no SHA-256 pins at %s\n' "$what" "$pins" >&2
        return 1
    fi
    expected="$(grep -v '^#' "$pins" | grep -v '^[[:space:]]*$' | LC_ALL=C sort -k2)"
    actual="$(cd "$dir" && find . -maxdepth 1 -name '*.jar' -printf '%f\0' | LC_ALL=C sort -z \
        | xargs -0 -r sha256sum | LC_ALL=C sort -k2)"
    [ "$expected" = "$actual" ] && return 0
    problems="$(join -1 2 -2 2 -a 1 -a 2 -e MISSING -o 0,1.1,2.1 \
        <(echo "$expected") <(echo "$actual") \
        | awk '$2 != $3 {
            if ($3 == "MISSING") print "  missing:    " $1;
            else if ($2 == "MISSING") print "  not pinned: " $1 " (sha256 " $3 ")";
            else print "  MISMATCH:   " $1 " is sha256 " $3 ", pinned " $2 }')"
    printf '%s: error: the jars in %s do not match the pins in %s:\n%s\n' \
        "$what" "$dir" "$pins" "$problems" >&2
    return 1
}

# pins_write DIR PIN_FILE HEADER: records DIR's jars as the pins (after a deliberate
# upgrade; review the diff).
pins_write() {
    local dir="$1" pins="$2" header="$3"
    {
        printf '# %s\n' "$header"
        printf '# Written by the pin command; checked before every start. Review changes.\n'
        (cd "$dir" && find . -maxdepth 1 -name '*.jar' -printf '%f\0' | LC_ALL=C sort -z \
            | xargs -0 -r sha256sum)
    } >"$pins"
}
