#!/usr/bin/env bash
# `make lab-destroy`: tears down the hosts of the lab fleet (inventory/lab, group lab) that
# tools/lab/lab-up.sh booted; other lab hosts (molecule scenarios) are left alone.
exec "$(dirname "${BASH_SOURCE[0]}")/lab-up.sh" destroy
