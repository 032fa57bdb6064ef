#!/bin/sh
# ask.sh: drop a prompt into the spool the safe way (write aside, then one atomic rename).
#   ./ask.sh "Why is the sky blue?"            # prompt as arguments
#   echo "Summarize this" | ./ask.sh           # prompt on stdin
#   MODEL=opus PRIORITY=high ./ask.sh "..."    # frontmatter from the environment
# It prints the dropped file's name, which names the task: `spoold wait "$(./ask.sh ...)"`.
set -eu
umask 077                                   # a new spool is private (0700), as `spoold init` makes it
spool="${SPOOLD_DIR:-$HOME/async}"
mkdir -p "$spool/inbox"
name="ask-$(date +%Y%m%d-%H%M%S)-$$.md"
staging="$spool/inbox/.$name.tmp"          # a dotfile: the daemon ignores it while we write
quote() { printf "'%s'" "$(printf %s "$1" | sed "s/'/''/g")"; }  # a YAML single-quoted value, whatever it holds
{
  printf -- '---\nmodel: %s\npriority: %s\n---\n' "$(quote "${MODEL:-sonnet}")" "$(quote "${PRIORITY:-normal}")"
  if [ "$#" -gt 0 ]; then printf '%s\n' "$*"; else cat; fi
} > "$staging"
mv "$staging" "$spool/inbox/$name"
echo "$name"
