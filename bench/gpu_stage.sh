# Shared by the one-call GPU scripts (source it): $out, and stage NAME SECONDS COMMAND..., which runs COMMAND
# under a time limit into $out/gpu_NAME.txt and appends its exit status and duration, so that a hang in one
# stage still returns the other stages' logs.
out=${OUT:-./gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/gpu_$name.txt" 2>&1
  local rc=$?
  echo "# exit $rc after $((SECONDS - start)) s (limit $limit s)" >>"$out/gpu_$name.txt"
  echo "stage $name: exit $rc, $((SECONDS - start)) s"
}
