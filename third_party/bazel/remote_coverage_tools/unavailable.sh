#!/bin/sh
echo "coverage tools are not available in Gyre's offline build" >&2
exit 1
