module quotaflow.invalid/benchloadgen

go 1.19
