// fieldsync dashboard (filled in next)
