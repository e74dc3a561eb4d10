#!/usr/bin/env bash
# Services the server tests need, from Debian's packages: Chromium (browser test) and a
# PostgreSQL cluster with a test role and database (API tests on PostgreSQL).
# Idempotent; run it (prints the URL) or source it (also exports LEUKODIFF_TEST_POSTGRES_URL).
# Runs as root on CI machines; the role and password are for a throwaway test database.

_leukodiff_services() {
    local role=leukodiff password=leukodiff database=leukodiff_test
    local missing=()
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "services: installing ${missing[*]} from Debian" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || return 1
    fi

    local version
    version=$(basename "$(compgen -G "/usr/lib/postgresql/*/bin/postgres" | sort -V | tail -1 \
        | xargs dirname | xargs dirname)")
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {found=1} END {exit !found}'; then
        pg_createcluster "$version" main >/dev/null || return 1
    fi
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online" {ok=1} END {exit !ok}'; then
        pg_ctlcluster "$version" main start || return 1
    fi
    local port
    port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')

    local psql=(runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qtA)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = '$role'")" != 1 ]; then
        "${psql[@]}" -c "CREATE ROLE $role LOGIN PASSWORD '$password'" || return 1
    fi
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" != 1 ]; then
        "${psql[@]}" -c "CREATE DATABASE $database OWNER $role" || return 1
    fi

    export LEUKODIFF_TEST_POSTGRES_URL="postgresql+psycopg://$role:$password@127.0.0.1:$port/$database"
    echo "services: chromium at /usr/bin/chromium; PostgreSQL $version on port $port" >&2
    echo "LEUKODIFF_TEST_POSTGRES_URL=$LEUKODIFF_TEST_POSTGRES_URL"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    _leukodiff_services
else
    _leukodiff_services || return 1
fi
