# DerivedAge.txt -> C++ initializer lines {0xLO, 0xHI}, for every range assigned after 9.0.
# Lines look like "1F900..1F90B  ; 10.0 #  ...". Unsorted (grouped by age); the user sorts.
BEGIN { FS = ";" }
/^[0-9A-F]/ {
  n = split($1, r, /\.\./)
  lo = r[1]; hi = (n > 1) ? r[2] : r[1]
  gsub(/ /, "", lo); gsub(/ /, "", hi)
  age = $2; sub(/#.*/, "", age); gsub(/ /, "", age)
  split(age, v, ".")
  if (v[1] + 0 > 9 || (v[1] + 0 == 9 && v[2] + 0 > 0)) printf "{0x%s, 0x%s},\n", lo, hi
}
