#!/bin/zsh -f
# zshcomplete.zsh FPATH_DIR LINE: print, one a line, what zsh's completion offers at
# the end of LINE (typed into an interactive zsh on a pseudo-terminal, TAB pressed),
# with FPATH_DIR's completion functions loaded by compinit. Used by
# tests/test_completion.py; prints "zshcomplete: timed out" and exits 1 if the
# completion never finishes.
zmodload zsh/zpty || exit 2
dir=$1 line=$2

zpty z zsh -f -i
zpty -w z "fpath=(${(q)dir} \$fpath); autoload -Uz compinit; compinit -u -D"
# Every candidate, as completion functions add them: print it instead of
# showing a menu. Calls that only collect (-O, -A, -D) are left alone.
zpty -w z 'compadd() {
    if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi
    local -a hits; builtin compadd -A hits "$@"
    local h; for h in $hits; do print -r -- "CAND""IDATE:$h"; done
    builtin compadd "$@"
}'
zpty -w z 'comppostfuncs=(_zshcomplete_done); _zshcomplete_done() { print -r -- "COMPLETION""-DONE"; exit }'
zpty -w z "PS1='' PROMPT='' RPROMPT=''; setopt nobeep"
zpty -w z "zstyle ':completion:*' menu no"
zpty -w -n z "$line"$'\t'

typeset -i waited=0
typeset out piece
while true; do
    if ! zpty -r -t z out; then
        sleep 0.05
        (( waited++ > 600 )) && { print -u2 "zshcomplete: timed out"; exit 1 }
        continue
    fi
    for piece in ${(f)${out//$'\r'/}}; do
        case $piece in
            *COMPLETION-DONE*) break 2 ;;
            *CANDIDATE:*) print -r -- ${piece#*CANDIDATE:} ;;
        esac
    done
done
zpty -d z
